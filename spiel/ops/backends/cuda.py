"""CUDA kernels from the compiled extension ``spiel._C`` (backend "cuda").

Importing ``spiel._C`` loads the library, which registers the private ops ``torch.ops.spiel._cuda_*``
(csrc/bindings.cpp). This module never fails: without the extension ``AVAILABLE`` is False and ``REASON``
says why (shown by ``spiel.ops.backend_info()``).
"""
from __future__ import annotations

import torch

from .._dispatch import register_kernel
from ..adamw import bump_host_counts, host_count_groups, is_host_count

AVAILABLE = False
REASON = "spiel._C is not built"

try:
    import spiel._C  # noqa: F401
except Exception as exc:  # the extension is optional
    REASON = (f"spiel._C could not be imported ({type(exc).__name__}: {exc}); build it with "
              "`pip install --no-build-isolation -e .` (needs a CUDA toolkit; see setup.py)")
else:
    if not hasattr(torch.ops.spiel, "_cuda_merge_delta"):
        REASON = "spiel._C was imported but registered no _cuda_* ops"
    else:
        AVAILABLE = True
        REASON = ""


def _fp32_if_double(values: torch.Tensor) -> torch.Tensor:
    # the kernels take fp32/bf16/fp16 values; fp64 (allowed by the reference) is rounded to fp32 first,
    # which is what the contract's fp32(values[j]) does anyway
    return values.float() if values.dtype == torch.float64 else values


if AVAILABLE:
    _ops = torch.ops.spiel

    @register_kernel("merge_delta", "cuda")
    def merge_delta(weight, indices, values, out) -> None:
        _ops._cuda_merge_delta(weight, indices, _fp32_if_double(values), out)

    @register_kernel("nf4_dequantize_add_delta", "cuda")
    def nf4_dequantize_add_delta(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                 indices, values, out) -> None:
        _ops._cuda_nf4_dequantize_add_delta(packed, absmax, nested_absmax, nested_code, float(nested_offset),
                                            int(blocksize), indices, _fp32_if_double(values), out)

    @register_kernel("nf4_quantize", "cuda")
    def nf4_quantize(weight, blocksize):
        return _ops._cuda_nf4_quantize(weight, int(blocksize))

    if hasattr(_ops, "_cuda_sddmm"):

        @register_kernel("sddmm", "cuda")
        def sddmm(grad_output, input, indices, out_features, in_features, plan):
            return _ops._cuda_sddmm(grad_output, input, indices, int(out_features), int(in_features), plan)

    if hasattr(_ops, "_cuda_adamw_step_"):

        @register_kernel("adamw_step", "cuda")
        def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                       maximize) -> None:
            hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize))
            if not (steps and is_host_count(steps[0])):
                _ops._cuda_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, *hyper, 0.0)
                return
            # per-tensor host counts (the op hands in lists of one kind): no count list, one launch per count
            for count, sel in host_count_groups(steps):
                pick = lambda ts: [ts[i] for i in sel]  # noqa: E731
                _ops._cuda_adamw_step_(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), [], *hyper,
                                       count)
            bump_host_counts(steps)

    if hasattr(_ops, "_cuda_select_topk_abs"):

        @register_kernel("select_topk_abs", "cuda")
        def select_topk_abs(x, k, exclude, exclude_offset):
            # the kernel compares fp32 magnitudes; fp64 input is rounded first (the contract compares in fp32)
            x = x.float() if x.dtype == torch.float64 else x
            return _ops._cuda_select_topk_abs(x, int(k), exclude, int(exclude_offset))

    if hasattr(_ops, "_cuda_index_put_many_"):

        @register_kernel("index_put_many", "cuda")
        def index_put_many(dense, indices, values) -> None:
            _ops._cuda_index_put_many_(dense, indices, values)

        @register_kernel("index_select_many", "cuda")
        def index_select_many(dense, indices, out) -> None:
            _ops._cuda_index_select_many(dense, indices, out)

    if hasattr(_ops, "_cuda_drop_regrow_indices"):

        @register_kernel("drop_regrow_indices", "cuda")
        def drop_regrow_indices(values, indices, regrown):
            # the kernel compares fp32 magnitudes; fp64 values are rounded first (the contract compares in fp32)
            return _ops._cuda_drop_regrow_indices([_fp32_if_double(v) for v in values], indices, regrown)

    if hasattr(_ops, "_cuda_outer_threshold"):

        @register_kernel("outer_threshold", "cuda")
        def outer_threshold(rows, cols, keys, row_start, need, hi, sections, rounds):
            return _ops._cuda_outer_threshold(rows, cols, keys, row_start, need, hi, int(sections), int(rounds))
