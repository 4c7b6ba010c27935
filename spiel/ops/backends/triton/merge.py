"""Triton delta merge: ``out = weight + scatter(indices, values)`` in one pass (backend "triton").

Design (see benchmarks/NOTES.md, "Forward kernels (Triton)"):

- out-of-place: each program owns one contiguous chunk of ``BLOCK`` flat elements. It issues the dense load
  of its chunk, finds the range ``[lo, hi)`` of the sorted indices that fall in the chunk with a vectorised
  k-ary search (``_lower_bound``: ``S`` probes per step, ~3 dependent steps for k = 450K), writes the dense
  chunk, then -- after a CTA barrier, so its own dense stores are ordered before -- overwrites the delta
  positions with ``fp32(w[i]) + fp32(v)`` rounded once. The patched elements are stored twice, but both
  stores hit the same L2 line within microseconds, so DRAM sees one write; the extra traffic is the k
  (index, value) pairs the op must read anyway. No atomics.
- in place (``out`` is ``weight``): the dense part is the identity, so only the patch runs, over the k
  indices (a grid over ``indices``, not over the weight): k reads + k writes instead of a full pass.

Dtypes come from the pointers (weight/out bf16/fp16/fp32, values fp32/bf16/fp16, indices int32/int64): one
kernel source, specialised by Triton per dtype combination.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._dispatch import register_kernel

# Per weight element size: (elements per program, warps). 16 KB of weight per program for 2-byte dtypes.
# benchmarks/bench_forward.py --tune sweeps these; tests override them through _CONFIG_OVERRIDE.
MERGE_CONFIG = {
    2: (8192, 8),
    4: (4096, 8),
}
PATCH_TILE = 256        # indices handled per step of the patch loop
SEARCH_PROBES = 128     # probes per step of the k-ary search
INPLACE_BLOCK = 1024    # indices per program of the in-place (patch-only) kernel
_CONFIG_OVERRIDE: dict = {}  # e.g. {"block": 64, "num_warps": 1} (tests: many chunk boundaries on small tensors)

_INT32_SAFE = 2**31 - 2**20  # below this every offset we form fits in int32


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on the CPU through Triton's numpy interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even. On the GPU this is the native conversion; Triton's
    interpreter truncates fp32 -> bf16, so under it (EMULATE_BF16) the rounding is done on the bits."""
    if EMULATE_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def to_f32(x, EMULATE_BF16: tl.constexpr):
    """Exact widening to fp32 (under the interpreter, bf16 -> fp32 is done on the bits: its own conversion
    mishandles subnormals)."""
    if EMULATE_BF16 and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _lower_bound(idx_ptr, lo, hi, target, S: tl.constexpr):
    """First position j in [lo, hi] with idx[j] >= target, for sorted idx whose entries before lo are
    < target and from hi on are >= target. Vectorised k-ary search: S probes per step, range / S per step."""
    while hi > lo:
        step = (hi - lo + S - 1) // S
        pos = lo + tl.arange(0, S) * step
        inside = pos < hi
        probe = tl.load(idx_ptr + pos, mask=inside, other=0)
        below = (probe < target) & inside
        c = tl.sum(below.to(tl.int32), axis=0)
        new_hi = tl.minimum(lo + c * step, hi)
        lo = tl.where(c > 0, lo + (c - 1) * step + 1, lo)
        hi = new_hi
    return lo


@triton.jit(do_not_specialize=["k"])  # k == 1 must not become a constexpr (loop-carried search bounds)
def _merge_chunk_kernel(w_ptr, idx_ptr, val_ptr, out_ptr, n, k,
                        BLOCK: tl.constexpr, PT: tl.constexpr, S: tl.constexpr, BIG: tl.constexpr,
                        EMU: tl.constexpr):
    pid = tl.program_id(0)
    if BIG:
        start = pid.to(tl.int64) * BLOCK
        lo = tl.zeros((), dtype=tl.int64)
        kk = k.to(tl.int64)
    else:
        start = pid * BLOCK
        lo = tl.zeros((), dtype=tl.int32)
        kk = k
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask)  # issued first: in flight during the search
    lo = _lower_bound(idx_ptr, lo, kk, start, S)
    hi = _lower_bound(idx_ptr, lo, tl.minimum(kk, lo + BLOCK), start + BLOCK, S)  # unique: <= BLOCK in chunk
    tl.store(out_ptr + offs, w, mask=mask)
    if hi > lo:
        tl.debug_barrier()  # this CTA's dense stores are ordered before its patch stores
        for j0 in range(lo, hi, PT):
            j = j0 + tl.arange(0, PT)
            m = j < hi
            i = tl.load(idx_ptr + j, mask=m, other=0)
            v = tl.load(val_ptr + j, mask=m, other=0)
            wi = tl.load(w_ptr + i, mask=m, other=0)
            merged = to_f32(wi, EMU) + to_f32(v, EMU)
            tl.store(out_ptr + i, round_to(merged, out_ptr.dtype.element_ty, EMU), mask=m)


@triton.jit
def _merge_inplace_kernel(w_ptr, idx_ptr, val_ptr, k, BLOCK: tl.constexpr, BIG: tl.constexpr, EMU: tl.constexpr):
    pid = tl.program_id(0)
    if BIG:
        j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        j = pid * BLOCK + tl.arange(0, BLOCK)
    m = j < k
    i = tl.load(idx_ptr + j, mask=m, other=0)
    v = tl.load(val_ptr + j, mask=m, other=0)
    wi = tl.load(w_ptr + i, mask=m, other=0)
    merged = to_f32(wi, EMU) + to_f32(v, EMU)
    tl.store(w_ptr + i, round_to(merged, w_ptr.dtype.element_ty, EMU), mask=m)


def merge_config(dtype: torch.dtype) -> tuple:
    """(elements per program, warps) of the out-of-place merge for a weight dtype."""
    block, warps = MERGE_CONFIG[dtype.itemsize]
    return _CONFIG_OVERRIDE.get("block", block), _CONFIG_OVERRIDE.get("num_warps", warps)


@register_kernel("merge_delta", "triton")
def merge_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    n = weight.numel()
    k = indices.numel()
    if n == 0:
        return
    if out.data_ptr() == weight.data_ptr():
        if k == 0:
            return
        block = _CONFIG_OVERRIDE.get("inplace_block", INPLACE_BLOCK)
        big = k + block >= _INT32_SAFE or n >= _INT32_SAFE
        _merge_inplace_kernel[(triton.cdiv(k, block),)](out, indices, values, k, BLOCK=block, BIG=big,
                                                        EMU=interpreting(), num_warps=4)
        return
    block, warps = merge_config(weight.dtype)
    big = n + block >= _INT32_SAFE or k + block >= _INT32_SAFE
    _merge_chunk_kernel[(triton.cdiv(n, block),)](
        weight, indices, values, out, n, k,
        BLOCK=block, PT=_CONFIG_OVERRIDE.get("patch_tile", PATCH_TILE),
        S=_CONFIG_OVERRIDE.get("probes", SEARCH_PROBES), BIG=big, EMU=interpreting(), num_warps=warps)
