"""The delta gradient: ``(grad_output^T @ input)`` read only at flat indices, never formed.

Ops: ``spiel::sddmm`` and ``spiel::sddmm_plan`` (the per-index-set tiling, built once per index update and
passed back to ``sddmm`` to skip rebuilding it every call).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch
from .backends.sddmm_plan import is_row_plan
from ._validate import check_indices, check_same_device, check_tensor, contiguous

torch.library.define(
    "spiel::sddmm",
    "(Tensor grad_output, Tensor input, Tensor indices, int out_features, int in_features, Tensor? plan=None) -> Tensor",
)
torch.library.define("spiel::sddmm_plan", "(Tensor indices, int out_features, int in_features) -> Tensor")

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def sddmm_eager(grad_output, input, indices, out_features, in_features, plan=None):
    """The implementation of ``spiel::sddmm`` (no checks): called directly in eager mode by the layer's
    backward, saving the custom-op dispatch; traced code uses the op."""
    if grad_output.dtype == torch.float64:
        return _dispatch.kernel_for("sddmm", "torch")(grad_output, input, indices, out_features, in_features, plan)
    return _dispatch.call("sddmm", grad_output.device, grad_output, input, indices, out_features, in_features, plan)


torch.library.impl("spiel::sddmm", ["cpu", "cuda"])(sddmm_eager)


@torch.library.register_fake("spiel::sddmm")
def _sddmm_fake(grad_output, input, indices, out_features, in_features, plan=None):
    torch._check(grad_output.dim() == 2 and input.dim() == 2, lambda: "grad_output and input must be 2-D")
    torch._check(grad_output.shape[0] == input.shape[0], lambda: "grad_output and input must have the same tokens")
    dtype = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    return grad_output.new_empty((indices.shape[0],), dtype=dtype)


@torch.library.impl("spiel::sddmm_plan", ["cpu", "cuda"])
def _sddmm_plan_impl(indices, out_features, in_features):
    from .backends.sddmm_plan import build_plan

    return build_plan(indices, out_features, in_features)


@torch.library.register_fake("spiel::sddmm_plan")
def _sddmm_plan_fake(indices, out_features, in_features):
    size = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty((size,), dtype=torch.int32)


def flatten_tokens(grad_output: torch.Tensor, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[..., out] and [..., in] -> contiguous [T, out] and [T, in]."""
    return (contiguous("grad_output", grad_output.reshape(-1, grad_output.shape[-1])),
            contiguous("input", input.reshape(-1, input.shape[-1])))


def sddmm_plan(indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Tiling of ``indices`` for :func:`sddmm` (build once per index update, pass as ``plan=``)."""
    check_indices(indices, None, out_features * in_features, sorted_required=False)
    return torch.ops.spiel.sddmm_plan(contiguous("indices", indices), int(out_features), int(in_features))


def sddmm(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, out_features: int,
          in_features: int, *, plan: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight gradient ``grad_output^T @ input`` at flat ``indices`` only, in fp32.

    Args:
        grad_output: [..., out_features]; input: [..., in_features] (leading dims flattened to T tokens),
            same dtype, bf16/fp16/fp32 (float64 on the reference backend).
        indices: [k] int32/int64 unique flat row-major positions into [out, in], in range (sorted is fastest).
        plan: optional result of :func:`sddmm_plan` for exactly these indices: the kernels then run the
            strategy its cost model chose. Without a plan the Triton and CUDA backends run dense_blas (the
            vendor GEMM over bounded row bands, then a gather), the right choice at LoRA-like densities. A row
            plan (``sddmm_plan.build_row_plan``, O(out)) of *sorted* indices lets the CUDA backend run its
            sm90a wgmma kernel instead on H100/H200; the other backends treat it as no plan.
    Returns fp32 [k] (float64 for float64 inputs), accumulated in fp32, deterministic.
    """
    allowed = _INPUT_DTYPES + (torch.float64,)
    check_tensor("grad_output", grad_output, dtypes=allowed)
    check_tensor("input", input, dtypes=(grad_output.dtype,))
    if grad_output.dim() < 1 or grad_output.shape[-1] != out_features:
        raise ValueError(f"grad_output must have last dimension out_features={out_features}, got {tuple(grad_output.shape)}")
    if input.shape[-1] != in_features:
        raise ValueError(f"input must have last dimension in_features={in_features}, got {tuple(input.shape)}")
    if grad_output.shape[:-1].numel() != input.shape[:-1].numel():
        raise ValueError(
            f"grad_output and input must have the same number of tokens, got {tuple(grad_output.shape)} and {tuple(input.shape)}"
        )
    check_indices(indices, None, out_features * in_features, sorted_required=is_row_plan(plan, out_features))
    check_same_device(grad_output=grad_output, input=input, indices=indices, plan=plan)
    go, x = flatten_tokens(grad_output, input)
    return torch.ops.spiel.sddmm(go, x, contiguous("indices", indices), int(out_features), int(in_features), plan)
