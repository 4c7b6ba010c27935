"""Triton delta merge: ``out = weight + scatter(indices, values)`` in one pass (backend "triton").

Design (see benchmarks/NOTES.md, "Forward kernels (Triton)"):

- out-of-place: the flat output is cut into chunks of ``BLOCK`` elements. Per chunk: load the dense chunk;
  read the window ``indices[lo : lo + PT]`` starting at the chunk's first delta ``lo`` (those below the
  chunk's end are its deltas; a chunk with more than PT deltas reads further windows) and gather their
  weights; store the dense chunk; then -- after a CTA barrier, so the program's own dense stores are ordered
  before -- overwrite the delta positions with ``fp32(w[i]) + fp32(v)`` rounded once. The patched elements
  are stored twice, but both stores hit the same L2 line within microseconds, so DRAM sees one write; the
  extra traffic is the k (index, value) pairs the op must read anyway. No atomics.
  ``PERSISTENT`` off: one program per chunk, ``lo`` found by a vectorised k-ary search (``_lower_bound``).
  On: ``programs per SM x SM count`` programs, each walks a contiguous run of chunks, carries ``lo`` from one
  chunk to the next (one search per program) and loads chunk c+1 before it stores and patches chunk c, so
  a load is in flight while the patch's dependent gathers run.
- in place (``out`` is ``weight``): the dense part is the identity, so only the patch runs, over the k
  indices (a grid over ``indices``, not over the weight): k reads + k writes instead of a full pass.

Dtypes come from the pointers (weight/out bf16/fp16/fp32, values fp32/bf16/fp16, indices int32/int64): one
kernel source, specialised by Triton per dtype combination. Launch knobs: ``MERGE_CONFIG``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..._dispatch import register_kernel

# The launch configuration, and the only place its defaults live: (weight element size in bytes, size class)
# -> knobs; size class "large" when the weight has >= LARGE_N elements. The knobs:
#   block       elements per chunk (16 KiB of weight at 8192 x 2 B)
#   num_warps   warps per program
#   persistent  0: one program per chunk; m > 0: m programs per SM, each walking a contiguous run of chunks
#               with the next chunk's load in flight (bytes in flight per SM ~ m x block x itemsize)
#   evict       eviction policy of the dense load: "" (default) or "evict_first" (L1 and, by a
#               createpolicy hint, L2)
#   store       cache modifier of the dense store: "" (default, write-back) or ".cs" (streaming)
# Optional: patch_tile (deltas per window; default max(256, block // 32)), probes (k-ary search width).
# Source: `python benchmarks/bench_forward.py --tune` on an H100 (2026-11-23, session 2; 74 variants, each
# checked exact on both shapes): 11008x4096 bf16 at 1% best with 8192 x 8 warps and streaming stores (.cs):
# 0.0716 ms = 96% of the same-run copy (v1 knobs: 94%; the CUDA merge: 80%); 4096x4096 best without .cs:
# 0.0300 ms (its 32 MiB output partly stays in L2). evict_first loads cost 5-15% (the patch then misses L2);
# persistent programs did not help. fp32 entries keep the bf16 bytes per program (half the elements), not
# measured. Re-tune with the command above; it prints the entries to paste here.
MERGE_CONFIG = {
    (2, "small"): dict(block=8192, num_warps=8, persistent=0, evict="", store=""),
    (2, "large"): dict(block=8192, num_warps=8, persistent=0, evict="", store=".cs"),
    (4, "small"): dict(block=4096, num_warps=8, persistent=0, evict="", store=""),
    (4, "large"): dict(block=4096, num_warps=8, persistent=0, evict="", store=".cs"),
}
LARGE_N = 1 << 25       # 33.5M elements: 4096x4096 is "small", 11008x4096 "large"
SEARCH_PROBES = 128     # probes per step of the k-ary search
INPLACE_BLOCK = 1024    # indices per program of the in-place (patch-only) kernel
_CONFIG_OVERRIDE: dict = {}  # any knob above, e.g. {"block": 64, "num_warps": 1} (tests, the --tune sweep)

_INT32_SAFE = 2**31 - 2**20  # below this every offset we form fits in int32


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on the CPU through Triton's numpy interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(table: dict, override: dict, itemsize: int, n: int) -> dict:
    """The knobs for a tensor of ``n`` elements of ``itemsize`` bytes: the table's entry, then ``override``."""
    cfg = dict(table[(itemsize, "large" if n >= LARGE_N else "small")])
    cfg.update(override)
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # interpreter: a few programs, each walking many chunks


def grid_size(n: int, block: int, persistent: int, device: torch.device) -> int:
    chunks = triton.cdiv(n, block)
    return min(chunks, persistent * _sm_count(device)) if persistent else chunks


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


@triton.jit
def chunk_range(n, BLOCK: tl.constexpr, PERSISTENT: tl.constexpr, BIG: tl.constexpr):
    """(first chunk, end chunk, first element) of this program: one chunk, or a contiguous even share."""
    pid = tl.program_id(0)
    if PERSISTENT:
        chunks = tl.cdiv(n, BLOCK).to(tl.int64)
        nprog = tl.num_programs(0).to(tl.int64)
        c0 = (pid.to(tl.int64) * chunks // nprog).to(tl.int32)
        c1 = ((pid + 1).to(tl.int64) * chunks // nprog).to(tl.int32)
    else:
        c0 = pid
        c1 = pid + 1
    if BIG:
        start = c0.to(tl.int64) * BLOCK
    else:
        start = c0 * BLOCK
    return c0, c1, start


@triton.jit
def delta_window(lo, kk, end, idx_ptr, val_ptr, PT: tl.constexpr):
    """The deltas j in [lo, lo + PT) with idx[j] < end (the chunk's end): (indices, values, mask, count).
    ``lo`` is the chunk's first delta, so these are the chunk's first (up to PT) deltas."""
    j = lo + tl.arange(0, PT)
    m = j < kk
    i = tl.load(idx_ptr + j, mask=m, other=0)
    m = m & (i < end)
    v = tl.load(val_ptr + j, mask=m, other=0)
    return i, v, m, tl.sum(m.to(tl.int32), axis=0)


@triton.jit
def _merge_patch(out_ptr, i, wi, v, m, EMU: tl.constexpr):
    tl.store(out_ptr + i, round_to(to_f32(wi, EMU) + to_f32(v, EMU), out_ptr.dtype.element_ty, EMU), mask=m)


@triton.jit(do_not_specialize=["k"])  # k == 1 must not become a constexpr (loop-carried search bounds)
def _merge_chunk_kernel(w_ptr, idx_ptr, val_ptr, out_ptr, n, k,
                        BLOCK: tl.constexpr, PT: tl.constexpr, S: tl.constexpr, BIG: tl.constexpr,
                        EMU: tl.constexpr, PERSISTENT: tl.constexpr, EVICT: tl.constexpr, STORE: tl.constexpr):
    c0, c1, start = chunk_range(n, BLOCK, PERSISTENT, BIG)
    if BIG:
        lo = tl.zeros((), dtype=tl.int64)
        kk = k.to(tl.int64)
    else:
        lo = tl.zeros((), dtype=tl.int32)
        kk = k
    offs = start + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, eviction_policy=EVICT)  # issued first: in flight during the search
    lo = _lower_bound(idx_ptr, lo, kk, start, S)  # the chunk's first delta (later chunks: carried)
    for c in range(c0, c1):
        end = start + BLOCK
        if PERSISTENT:  # the next chunk's load is in flight while this one is stored and patched
            nxt = offs + BLOCK
            w_next = tl.load(w_ptr + nxt, mask=(nxt < n) & (c + 1 < c1), eviction_policy=EVICT)
        i, v, m, cnt = delta_window(lo, kk, end, idx_ptr, val_ptr, PT)
        wi = tl.load(w_ptr + i, mask=m, other=0)  # lines this chunk has just loaded: L1/L2 hits
        tl.store(out_ptr + offs, w, mask=offs < n, cache_modifier=STORE)
        if cnt > 0:
            tl.debug_barrier()  # this CTA's dense stores are ordered before its patch stores
            _merge_patch(out_ptr, i, wi, v, m, EMU)
        lo += cnt
        while cnt == PT:  # more than PT deltas in the chunk: next window (already behind the barrier)
            i, v, m, cnt = delta_window(lo, kk, end, idx_ptr, val_ptr, PT)
            _merge_patch(out_ptr, i, tl.load(w_ptr + i, mask=m, other=0), v, m, EMU)
            lo += cnt
        if PERSISTENT:
            w = w_next
            offs = nxt
            start = end


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


def merge_config(dtype: torch.dtype, n: int) -> dict:
    """The launch knobs of the out-of-place merge for a weight of ``n`` elements of ``dtype``."""
    return launch_config(MERGE_CONFIG, _CONFIG_OVERRIDE, dtype.itemsize, n)


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
    cfg = merge_config(weight.dtype, n)
    block, pt = cfg["block"], cfg.get("patch_tile", max(256, cfg["block"] // 32))
    big = n + 2 * block >= _INT32_SAFE or k + block + pt >= _INT32_SAFE
    _merge_chunk_kernel[(grid_size(n, block, cfg["persistent"], weight.device),)](
        weight, indices, values, out, n, k,
        BLOCK=block, PT=pt, S=cfg.get("probes", SEARCH_PROBES), BIG=big, EMU=interpreting(),
        PERSISTENT=cfg["persistent"] > 0, EVICT=cfg["evict"], STORE=cfg["store"], num_warps=cfg["num_warps"])
