"""Opt-in fp8 delta gradient: ``spiel::sddmm_fp8``.

The same quantity as :func:`spiel.ops.sddmm` -- ``(grad_output^T @ input)`` at flat indices -- computed from
e4m3 operands on Hopper's fp8 tensor cores (twice the bf16 rate), with one scale per output feature
(column of ``grad_output``) and one per input feature (column of ``input``), fp32 accumulation::

    s_g[r] = amax_t |grad_output[t, r]| / 448      q_g[t, r] = e4m3(clamp(grad_output[t, r] / s_g[r]))
    s_x[c] = amax_t |input[t, c]| / 448            q_x[t, c] = e4m3(clamp(input[t, c] / s_x[c]))
    result[j] = bf16(s_g[r_j] * s_x[c_j] * sum_t q_g[t, r_j] * q_x[t, c_j])      (returned as fp32)

(a zero column gets scale 1). Each operand element carries a relative error of at most 2**-4 (e4m3 has 3
mantissa bits) or an absolute error of ``s * 2**-10`` below e4m3's normal range, so
``|result - exact| <= ~0.13 * sum_t |g| |x|`` (tests check this bound against float64). Off by default:
``sparse_delta_linear(..., fp8_weight_grad=True)`` / ``SparseDeltaLinear.fp8_weight_grad = True`` opt in.
"""
from __future__ import annotations

import torch

from . import _dispatch
from ._validate import check_indices, check_same_device, check_tensor, contiguous

torch.library.define(
    "spiel::sddmm_fp8",
    "(Tensor grad_output, Tensor input, Tensor indices, int out_features, int in_features) -> Tensor",
)

E4M3_MAX = 448.0
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.impl("spiel::sddmm_fp8", ["cpu", "cuda"])
def _sddmm_fp8_impl(grad_output, input, indices, out_features, in_features):
    return _dispatch.call("sddmm_fp8", grad_output.device, grad_output, input, indices, out_features, in_features)


@torch.library.register_fake("spiel::sddmm_fp8")
def _sddmm_fp8_fake(grad_output, input, indices, out_features, in_features):
    torch._check(grad_output.dim() == 2 and input.dim() == 2, lambda: "grad_output and input must be 2-D")
    torch._check(grad_output.shape[0] == input.shape[0], lambda: "grad_output and input must have the same tokens")
    return grad_output.new_empty((indices.shape[0],), dtype=torch.float32)


def column_scales(x: torch.Tensor) -> torch.Tensor:
    """fp32 [n] per-column scales of a [T, n] operand: ``amax_t |x| / 448`` (1 for an all-zero column)."""
    if x.shape[0] == 0:
        return torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=0, dtype=torch.float32)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def sddmm_fp8(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, out_features: int,
              in_features: int) -> torch.Tensor:
    """The delta gradient at ``indices`` from fp8 (e4m3) operands with per-row/per-column scales.

    Args:
        grad_output: [..., out_features]; input: [..., in_features] (same dtype: bf16/fp16/fp32; leading dims
            flattened to T tokens).
        indices: [k] int32/int64 unique flat row-major positions into [out, in].
    Returns fp32 [k]. Fast path (backend "triton"): a fused Triton quantize-and-transpose of each operand,
    then cuBLASLt fp8 GEMMs (``torch._scaled_mm``, fp32 accumulation) over bounded row bands, each band's
    entries gathered; extra memory O(T * (out + in)) bytes of fp8 operands plus one band buffer, never
    [out, in]. The reference ("torch") emulates the same quantization exactly in fp32.
    """
    check_tensor("grad_output", grad_output, dtypes=_INPUT_DTYPES)
    check_tensor("input", input, dtypes=(grad_output.dtype,))
    if grad_output.dim() < 1 or grad_output.shape[-1] != out_features:
        raise ValueError(f"grad_output must have last dimension out_features={out_features}, "
                         f"got {tuple(grad_output.shape)}")
    if input.shape[-1] != in_features:
        raise ValueError(f"input must have last dimension in_features={in_features}, got {tuple(input.shape)}")
    if grad_output.shape[:-1].numel() != input.shape[:-1].numel():
        raise ValueError(f"grad_output and input must have the same number of tokens, got "
                         f"{tuple(grad_output.shape)} and {tuple(input.shape)}")
    check_indices(indices, None, out_features * in_features, sorted_required=False)
    check_same_device(grad_output=grad_output, input=input, indices=indices)
    go = contiguous("grad_output", grad_output.reshape(-1, out_features))
    x = contiguous("input", input.reshape(-1, in_features))
    return torch.ops.spiel.sddmm_fp8(go, x, contiguous("indices", indices), int(out_features), int(in_features))
