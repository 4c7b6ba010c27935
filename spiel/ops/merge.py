"""Delta merge: ``W + scatter(indices, values)`` as one op.

Ops: ``spiel::merge_delta`` (functional) and ``spiel::merge_delta_into`` (writes into ``out``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from ._validate import (
    WEIGHT_DTYPES,
    check_indices,
    check_same_device,
    check_tensor,
    contiguous,
)

torch.library.define("spiel::merge_delta", "(Tensor weight, Tensor indices, Tensor values) -> Tensor")
torch.library.define(
    "spiel::merge_delta_into", "(Tensor weight, Tensor indices, Tensor values, Tensor(a!) out) -> ()"
)


def _kernel(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    if weight.dtype == torch.float64 or values.dtype == torch.float64:
        _dispatch.kernel_for("merge_delta", "torch")(weight, indices, values, out)
    else:
        _dispatch.call("merge_delta", weight.device, weight, indices, values, out)


def merge_delta_eager(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The implementation of ``spiel::merge_delta`` (no checks): called directly in eager mode by the layer's
    autograd function, saving the custom-op dispatch on a launch-bound step; traced code uses the op."""
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    _kernel(weight, indices, values, out)
    return out


torch.library.impl("spiel::merge_delta", ["cpu", "cuda"])(merge_delta_eager)


@torch.library.impl("spiel::merge_delta_into", ["cpu", "cuda"])
def _merge_delta_into_impl(weight, indices, values, out):
    _kernel(weight, indices, values, out)


def _fake_checks(weight, indices, values):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    torch._check(indices.dim() == 1 and values.dim() == 1, lambda: "indices and values must be 1-D")
    torch._check(indices.shape[0] == values.shape[0], lambda: "indices and values must have the same length")


@torch.library.register_fake("spiel::merge_delta")
def _merge_delta_fake(weight, indices, values):
    _fake_checks(weight, indices, values)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("spiel::merge_delta_into")
def _merge_delta_into_fake(weight, indices, values, out):
    _fake_checks(weight, indices, values)


def check_merge_args(weight, indices, values, out=None) -> None:
    check_tensor("weight", weight, dtypes=WEIGHT_DTYPES + (torch.float64,), ndim=2)
    check_indices(indices, values, weight.numel(), reference=weight.dtype == torch.float64)
    check_same_device(weight=weight, indices=indices, values=values, out=out)
    if values.dtype == torch.float64 and weight.dtype != torch.float64:
        raise TypeError("values may be float64 only with a float64 weight (reference backend)")
    if out is not None:
        check_tensor("out", out, dtypes=(weight.dtype,))
        if out.shape != weight.shape:
            raise ValueError(f"out must have weight's shape {tuple(weight.shape)}, got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")


def merge_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight + scatter(indices, values)`` in ``weight``'s dtype.

    Args:
        weight: [out, in] bf16/fp16/fp32 (float64 on the reference backend).
        indices: [k] int32/int64 flat row-major positions, sorted, unique, in range.
        values: [k] fp32/bf16/fp16 deltas.
        out: optional contiguous buffer of weight's shape and dtype to write into (may be ``weight`` itself
            for an in-place merge); reuse one across layers to avoid allocating per call.

    The addition is done in fp32 (float64 for float64) and rounded once. ``k = 0`` returns a copy of weight.
    """
    check_merge_args(weight, indices, values, out)
    weight = contiguous("weight", weight)
    indices = contiguous("indices", indices)
    values = contiguous("values", values)
    if out is None:
        return torch.ops.spiel.merge_delta(weight, indices, values)
    torch.ops.spiel.merge_delta_into(weight, indices, values, out)
    return out
