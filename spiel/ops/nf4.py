"""NF4 quantize / dequantize, and the fused NF4-dequantize-plus-delta.

Ops: ``spiel::nf4_quantize``, ``spiel::nf4_dequantize_add_delta`` and its ``_into`` form. The NF4 weight
travels through the schemas as its tensors (see :meth:`spiel.quant.NF4Weight.op_args`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..quant.nf4 import NESTED_BLOCKSIZE, VALID_BLOCKSIZES, NF4Weight, _double_quantize
from . import _dispatch
from ._validate import WEIGHT_DTYPES, check_indices, check_same_device, check_tensor, contiguous

_NF4_ARGS = "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float nested_offset, int blocksize"
torch.library.define(
    "spiel::nf4_dequantize_add_delta",
    f"({_NF4_ARGS}, int out_features, int in_features, ScalarType dtype, Tensor indices, Tensor values) -> Tensor",
)
torch.library.define(
    "spiel::nf4_dequantize_add_delta_into", f"({_NF4_ARGS}, Tensor indices, Tensor values, Tensor(a!) out) -> ()"
)
torch.library.define("spiel::nf4_quantize", "(Tensor weight, int blocksize) -> (Tensor, Tensor)")


def _kernel(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, indices, values, out):
    _dispatch.call("nf4_dequantize_add_delta", out.device, packed, absmax, nested_absmax, nested_code,
                   nested_offset, blocksize, indices, values, out)


def nf4_dequantize_add_delta_eager(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                   out_features, in_features, dtype, indices, values):
    """The implementation of ``spiel::nf4_dequantize_add_delta`` (no checks; see ``merge_delta_eager``)."""
    out = torch.empty(out_features, in_features, dtype=dtype, device=packed.device)
    _kernel(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, indices, values, out)
    return out


torch.library.impl("spiel::nf4_dequantize_add_delta", ["cpu", "cuda"])(nf4_dequantize_add_delta_eager)


@torch.library.impl("spiel::nf4_dequantize_add_delta_into", ["cpu", "cuda"])
def _nf4_dad_into_impl(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, indices, values,
                       out):
    _kernel(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, indices, values, out)


@torch.library.register_fake("spiel::nf4_dequantize_add_delta")
def _nf4_dad_fake(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                  in_features, dtype, indices, values):
    torch._check(packed.numel() * 2 == out_features * in_features, lambda: "packed size does not match shape")
    torch._check(indices.shape[0] == values.shape[0], lambda: "indices and values must have the same length")
    return packed.new_empty((out_features, in_features), dtype=dtype)


@torch.library.register_fake("spiel::nf4_dequantize_add_delta_into")
def _nf4_dad_into_fake(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, indices, values,
                       out):
    torch._check(packed.numel() * 2 == out.numel(), lambda: "packed size does not match out")
    torch._check(indices.shape[0] == values.shape[0], lambda: "indices and values must have the same length")


@torch.library.impl("spiel::nf4_quantize", ["cpu", "cuda"])
def _nf4_quantize_impl(weight, blocksize):
    return _dispatch.call("nf4_quantize", weight.device, weight, blocksize)


@torch.library.register_fake("spiel::nf4_quantize")
def _nf4_quantize_fake(weight, blocksize):
    n = weight.numel()
    return (weight.new_empty((n // 2,), dtype=torch.uint8),
            weight.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))


def _check_nf4(name: str, nf4) -> None:
    if not isinstance(nf4, NF4Weight):
        raise TypeError(f"{name} must be a spiel.quant.NF4Weight, got {type(nf4).__name__}")


def nf4_dequantize_add_delta(nf4: NF4Weight, indices: torch.Tensor, values: torch.Tensor, *,
                             dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None
                             ) -> torch.Tensor:
    """Dequantize an NF4 weight and add the sparse delta in one pass.

    Args:
        nf4: the frozen NF4 weight ([out, in] logical shape).
        indices: [k] int32/int64 sorted unique flat positions; values: [k] fp32/bf16/fp16 deltas.
        dtype: output dtype (bf16/fp16/fp32), default ``nf4.dtype``.
        out: optional contiguous [out, in] buffer of that dtype to write into (reuse across layers).

    Returns [out, in]: ``fp32(code[q] * absmax) + fp32(delta)``, rounded once.
    """
    _check_nf4("nf4", nf4)
    dtype = dtype or (out.dtype if out is not None else nf4.dtype)
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {dtype}")
    check_indices(indices, values, nf4.numel())
    check_same_device(packed=nf4.packed, indices=indices, values=values, out=out)
    indices = contiguous("indices", indices)
    values = contiguous("values", values)
    if out is None:
        return torch.ops.spiel.nf4_dequantize_add_delta(*nf4.op_args(), dtype, indices, values)
    check_tensor("out", out, dtypes=(dtype,))
    if tuple(out.shape) != tuple(nf4.shape) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(nf4.shape)}, got {tuple(out.shape)}")
    torch.ops.spiel.nf4_dequantize_add_delta_into(*nf4.op_args()[:6], indices, values, out)
    return out


def nf4_dequantize(nf4: NF4Weight, dtype: Optional[torch.dtype] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dequantize an NF4 weight to [out, in] (``dtype`` default ``nf4.dtype``)."""
    _check_nf4("nf4", nf4)
    empty_idx = torch.empty(0, dtype=torch.int32, device=nf4.device)
    empty_val = torch.empty(0, dtype=torch.float32, device=nf4.device)
    return nf4_dequantize_add_delta(nf4, empty_idx, empty_val, dtype=dtype, out=out)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 dtype: Optional[torch.dtype] = None) -> NF4Weight:
    """Quantize a 2-D weight to NF4 in bitsandbytes' layout.

    Args:
        weight: [out, in] bf16/fp16/fp32 with an even number of elements.
        blocksize: power of two 32..4096 (bitsandbytes' default 64).
        double_quant: also quantize the absmax (8-bit dynamic map, blocks of 256, like bitsandbytes'
            ``compress_statistics=True``).
        dtype: compute dtype of the result (default weight's dtype).
    """
    check_tensor("weight", weight, dtypes=WEIGHT_DTYPES, ndim=2)
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize}")
    if weight.numel() % 2:
        raise ValueError(f"weight must have an even number of elements for NF4, got shape {tuple(weight.shape)}")
    packed, absmax = torch.ops.spiel.nf4_quantize(contiguous("weight", weight), blocksize)
    dtype = dtype or weight.dtype
    if double_quant:
        q, nested_absmax, code, offset = _double_quantize(absmax)
        return NF4Weight(packed, q, weight.shape, blocksize, dtype, nested_absmax, code, offset)
    return NF4Weight(packed, absmax, weight.shape, blocksize, dtype)


__all__ = ["nf4_dequantize_add_delta", "nf4_dequantize", "nf4_quantize", "NESTED_BLOCKSIZE"]
