"""Triton NF4 kernels (backend "triton"): fused dequantize + sparse delta, and blockwise quantize.

``nf4_dequantize_add_delta``: the output is cut into chunks of ``BLOCK`` elements, handled as groups of GB
packed bytes (default GB = 4 for 16-bit outputs, 2 for fp32: 16 output bytes per group). Per group: one
absmax (decoded from the uint8 + nested state when double-quantized); per byte: split the nibbles, look both
codes up (``decode="table"``: two gathers from the 16-entry fp32 table; ``"pairs"``: one 8-byte gather from a
256-entry table of (code[high], code[low]) pairs; both L1-resident), multiply by the absmax in fp32,
interleave high/low back into element order -- a thread then holds whole 16-byte stores -- and store the
chunk once. The sparse delta uses the same scheme as the merge (see merge.py): the chunk's first delta ``lo``
(k-ary search, or carried from the previous chunk in the persistent variant), a window of the indices from
there, dense store, CTA barrier, then ``out[i] = round(fp32(code * absmax) + fp32(v))`` at the chunk's delta
positions. Same launch knobs as the merge (``DEQUANT_CONFIG``). All arithmetic is separate fp32
multiply/add (compiled with ``enable_fp_fusion=False``: no FMA contraction), so the result is bit-identical
to the reference.

``nf4_quantize``: each program owns whole absmax blocks ([ROWS, blocksize] tile): per-block max |w|,
``scaled = clamp(w * (1 / max(absmax, 1e-38)), -1, 1)`` (IEEE reciprocal ``div_rn``, as the reference), code =
number of the 15 NF4 midpoints strictly below ``scaled`` (``torch.bucketize(right=False)``), two codes per
byte, first element in the high nibble.
"""
from __future__ import annotations

import struct
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ....quant.nf4 import NESTED_BLOCKSIZE, NF4_CODE
from ..._dispatch import register_kernel
from .merge import (_INT32_SAFE, SEARCH_PROBES, _lower_bound, chunk_range, delta_window, grid_size, interpreting,
                    launch_config, round_to, to_f32)

# The launch configuration of the fused dequantize, and the only place its defaults live: (output element
# size in bytes, size class) -> knobs, size class as merge.MERGE_CONFIG ("large" from merge.LARGE_N
# elements). Same knobs as the merge (block = output elements per chunk: block / 2 packed bytes; num_warps;
# persistent; evict = policy of the packed load; store = modifier of the dense store), plus
#   decode  "table": two 4-byte gathers per packed byte from the 16 fp32 codes; "pairs": one 8-byte gather
#           from the 256-entry table of (code[high nibble], code[low nibble])
#   group   packed bytes per thread group: 64 // output bits (one 16-byte store per group) or twice that
# Source: `benchmarks/bench_forward.py --tune` on an H100 (2026-11-23, session 2; bf16 output, double quant,
# blocksize 64, 1%; each variant checked exact): best on both shapes 4096 outputs x 4 warps, 6 persistent
# programs per SM, table decode: 11008x4096 0.0541 ms = 87% of the same-run copy (v1 knobs 0.066 ms; the
# CUDA kernel 0.0604 ms = 78%), 4096x4096 0.0243 ms = 93%. "pairs" decode ties; group=8 is slower. fp32
# entries keep the bf16 bytes per program, not measured.
DEQUANT_CONFIG = {
    (2, "small"): dict(block=4096, num_warps=4, persistent=6, evict="", store="", decode="table", group=4),
    (2, "large"): dict(block=4096, num_warps=4, persistent=6, evict="", store="", decode="table", group=4),
    (4, "small"): dict(block=2048, num_warps=4, persistent=6, evict="", store="", decode="table", group=2),
    (4, "large"): dict(block=2048, num_warps=4, persistent=6, evict="", store="", decode="table", group=2),
}
QUANT_ELEMENTS = 4096  # weight elements per program of the quantize kernel (at least one absmax block)
_CONFIG_OVERRIDE: dict = {}

# Triton 3.6 wants the transposed group tile (see the kernel); 3.7+ the row-major one
_TRANSPOSED = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
_TINY_BITS = int(torch.tensor(1e-38, dtype=torch.float32).view(torch.int32))  # the reference's clamp bound
_TABLES: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _pair_table() -> torch.Tensor:
    """int64 [256]: for a packed byte b, fp32 bits of code[b >> 4] in the low word, code[b & 15] in the high."""
    bits = [struct.unpack("<I", struct.pack("<f", float(c)))[0] for c in NF4_CODE.tolist()]
    pairs = [bits[b >> 4] | (bits[b & 15] << 32) for b in range(256)]
    return torch.tensor([p - (1 << 64) if p >= 1 << 63 else p for p in pairs], dtype=torch.int64)


def _tables(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 code table, its 15 midpoints (computed as the reference does) and the pair table on ``device``."""
    key = (device.type, device.index if device.index is not None else -1)
    if key not in _TABLES:
        code = NF4_CODE.to(device)
        _TABLES[key] = (code, ((code[:-1] + code[1:]) / 2).contiguous(), _pair_table().to(device))
    return _TABLES[key]


@triton.jit
def _absmax_f32(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, blk, mask,
                DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr):
    """fp32 absmax of blocks ``blk`` (masked lanes: 0)."""
    if DOUBLE_QUANT:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + a) * scale + nested_offset  # separate mul and add (no fusion)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_load(start, packed_ptr, absmax_ptr, nested_absmax_ptr, n, valid, BS: tl.constexpr, NESTED: tl.constexpr,
              GB: tl.constexpr, NG: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TRANSPOSED: tl.constexpr,
              EVICT: tl.constexpr):
    """The raw loads of the chunk at ``start`` (``valid``: else all masked): packed bytes as NG groups of GB,
    and per group its absmax (uint8 when double-quantized, with the nested scale; else fp32, twice).

    A thread holds whole groups, so after splitting the nibbles and interleaving them it holds 16-byte runs of
    output = whole 16-byte stores, the layout the store wants (16-byte packed vectors would need a
    shared-memory shuffle before the store). The code-table gathers must get the same layout as the packed
    load: Triton >= 3.7 gives it to a [NG, GB] tile, 3.6 (whose coalescing orders a gather's dims 0-first) to
    the transposed [GB, NG] tile."""
    gstart = start + tl.arange(0, NG) * (2 * GB)                       # first element of each group
    if TRANSPOSED:
        byte = (gstart // 2)[None, :] + tl.arange(0, GB)[:, None]    # [GB, NG]
        gs = gstart[None, :]
    else:
        byte = (gstart // 2)[:, None] + tl.arange(0, GB)[None, :]    # [NG, GB]
        gs = gstart[:, None]
    p = tl.load(packed_ptr + byte, mask=(byte < n // 2) & valid, other=0, eviction_policy=EVICT)
    gm = (gs < n) & valid
    if DOUBLE_QUANT:
        a = tl.load(absmax_ptr + gs // BS, mask=gm, other=0)
        s2 = tl.load(nested_absmax_ptr + gs // BS // NESTED, mask=gm, other=0.0)
    else:
        a = tl.load(absmax_ptr + gs // BS, mask=gm, other=0.0)
        s2 = a
    return p, a, s2


@triton.jit
def _nf4_decode(p, a, s2, code_ptr, pair_ptr, nested_code_ptr, nested_offset, GB: tl.constexpr, NG: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr, TRANSPOSED: tl.constexpr, PAIRS: tl.constexpr):
    """fp32 values [NG, 2 GB] of a chunk loaded by ``_nf4_load``, in element order (2p high, 2p+1 low)."""
    if DOUBLE_QUANT:
        scale = tl.load(nested_code_ptr + a.to(tl.int32)) * s2 + nested_offset  # separate mul and add
    else:
        scale = a
    if PAIRS:
        pair = tl.load(pair_ptr + p.to(tl.int32))
        hi_v = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * scale
        lo_v = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale
    else:
        hi_v = tl.load(code_ptr + (p >> 4).to(tl.int32)) * scale
        lo_v = tl.load(code_ptr + (p & 0xF).to(tl.int32)) * scale
    if TRANSPOSED:
        return tl.reshape(tl.permute(tl.join(hi_v, lo_v), (1, 0, 2)), (NG, 2 * GB))
    else:
        return tl.reshape(tl.join(hi_v, lo_v), (NG, 2 * GB))


@triton.jit
def _nf4_at(i, m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, code_ptr,
            BS: tl.constexpr, NESTED: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 dequantized values at flat positions ``i`` (masked lanes: 0)."""
    b = tl.load(packed_ptr + i // 2, mask=m, other=0).to(tl.int32)
    q = tl.where((i % 2) == 0, b >> 4, b & 0xF)
    s = _absmax_f32(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, i // BS, m, DOUBLE_QUANT, NESTED)
    return tl.load(code_ptr + q) * s


@triton.jit(do_not_specialize=["k"])
def _nf4_dequant_delta_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, code_ptr,
                              pair_ptr, idx_ptr, val_ptr, out_ptr, n, k,
                              BS: tl.constexpr, BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                              NESTED: tl.constexpr, PT: tl.constexpr, S: tl.constexpr, BIG: tl.constexpr,
                              EMU: tl.constexpr, TRANSPOSED: tl.constexpr, GB: tl.constexpr,
                              PERSISTENT: tl.constexpr, EVICT: tl.constexpr, STORE: tl.constexpr,
                              PAIRS: tl.constexpr):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    NG: tl.constexpr = BLOCK // (2 * GB)  # groups per chunk
    c0, c1, start = chunk_range(n, BLOCK, PERSISTENT, BIG)
    if BIG:
        lo = tl.zeros((), dtype=tl.int64)
        kk = k.to(tl.int64)
    else:
        lo = tl.zeros((), dtype=tl.int32)
        kk = k
    p, a, s2 = _nf4_load(start, packed_ptr, absmax_ptr, nested_absmax_ptr, n, c0 < c1, BS, NESTED, GB, NG,
                         DOUBLE_QUANT, TRANSPOSED, EVICT)  # issued first: in flight during the search
    offs = (start + tl.arange(0, NG) * (2 * GB))[:, None] + tl.arange(0, 2 * GB)[None, :]
    lo = _lower_bound(idx_ptr, lo, kk, start, S)  # the chunk's first delta (later chunks: carried)
    for c in range(c0, c1):
        end = start + BLOCK
        if PERSISTENT:  # the next chunk's loads are in flight while this one is decoded, stored and patched
            p_next, a_next, s2_next = _nf4_load(end, packed_ptr, absmax_ptr, nested_absmax_ptr, n, c + 1 < c1, BS,
                                                NESTED, GB, NG, DOUBLE_QUANT, TRANSPOSED, EVICT)
        # The order only changes register allocation (sm_90, bf16, 8192 / 8 warps, table decode, Triton 3.8):
        # window first 80 registers persistent / 103 not; decode first 95 / 60 (Triton 3.6: 64 either way).
        if PERSISTENT:
            i, v, m, cnt = delta_window(lo, kk, end, idx_ptr, val_ptr, PT)
            vals = _nf4_decode(p, a, s2, code_ptr, pair_ptr, nested_code_ptr, nested_offset, GB, NG, DOUBLE_QUANT,
                               TRANSPOSED, PAIRS)
        else:
            vals = _nf4_decode(p, a, s2, code_ptr, pair_ptr, nested_code_ptr, nested_offset, GB, NG, DOUBLE_QUANT,
                               TRANSPOSED, PAIRS)
            i, v, m, cnt = delta_window(lo, kk, end, idx_ptr, val_ptr, PT)
        d = _nf4_at(i, m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, code_ptr,
                    BS, NESTED, DOUBLE_QUANT)
        tl.store(out_ptr + offs, round_to(vals, out_ty, EMU), mask=offs < n, cache_modifier=STORE)
        if cnt > 0:
            tl.debug_barrier()  # this CTA's dense stores are ordered before its patch stores
            tl.store(out_ptr + i, round_to(d + to_f32(v, EMU), out_ty, EMU), mask=m)  # fp32 add (no FMA)
        lo += cnt
        while cnt == PT:  # more than PT deltas in the chunk: next window (already behind the barrier)
            i, v, m, cnt = delta_window(lo, kk, end, idx_ptr, val_ptr, PT)
            d = _nf4_at(i, m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, code_ptr,
                        BS, NESTED, DOUBLE_QUANT)
            tl.store(out_ptr + i, round_to(d + to_f32(v, EMU), out_ty, EMU), mask=m)
            lo += cnt
        if PERSISTENT:
            p = p_next
            a = a_next
            s2 = s2_next
            offs = offs + BLOCK
            start = end


@triton.jit
def _nf4_quantize_kernel(w_ptr, mid_ptr, packed_ptr, absmax_ptr, n, nblocks,
                         BS: tl.constexpr, ROWS: tl.constexpr, BIG: tl.constexpr, TINY_BITS: tl.constexpr,
                         EMU: tl.constexpr):
    HALF: tl.constexpr = BS // 2
    pid = tl.program_id(0)
    if BIG:
        blk = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    else:
        blk = pid * ROWS + tl.arange(0, ROWS)
    offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]               # [ROWS, BS]
    mask = offs < n
    w = to_f32(tl.load(w_ptr + offs, mask=mask, other=0), EMU)
    amax = tl.max(tl.abs(w), axis=1)                                    # [ROWS]
    tl.store(absmax_ptr + blk, amax, mask=blk < nblocks)
    # absmax.clamp(min=1e-38) with fp32(1e-38) (a subnormal: a Python float literal would become fp64)
    tiny = tl.full((ROWS,), TINY_BITS, tl.int32).to(tl.float32, bitcast=True)
    inv = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.maximum(amax, tiny))
    scaled = w * inv[:, None]
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    q = tl.zeros((ROWS, BS), dtype=tl.int32)
    for t in tl.static_range(15):
        q += (scaled > tl.load(mid_ptr + t)).to(tl.int32)
    first, second = tl.split(tl.reshape(q, (ROWS, HALF, 2)))
    byte = ((first << 4) | second).to(tl.uint8)
    boffs = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + boffs, byte, mask=boffs < n // 2)


def dequant_config(dtype: torch.dtype, n: int) -> dict:
    """The launch knobs of the fused dequantize for ``n`` output elements of ``dtype``."""
    return launch_config(DEQUANT_CONFIG, _CONFIG_OVERRIDE, dtype.itemsize, n)


@register_kernel("nf4_dequantize_add_delta", "triton")
def nf4_dequantize_add_delta(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                             indices, values, out) -> None:
    n = out.numel()
    k = indices.numel()
    if n == 0:
        return
    code, _, pairs = _tables(out.device)
    double_quant = absmax.dtype == torch.uint8
    cfg = dequant_config(out.dtype, n)
    block, pt = cfg["block"], cfg.get("patch_tile", max(256, cfg["block"] // 32))
    gb = min(cfg["group"], int(blocksize) // 2, block // 2)  # a group lies inside one absmax block and chunk
    big = n + 2 * block >= _INT32_SAFE or k + block + pt >= _INT32_SAFE
    _nf4_dequant_delta_kernel[(grid_size(n, block, cfg["persistent"], out.device),)](
        packed, absmax, nested_absmax if double_quant else absmax, nested_code if double_quant else code,
        float(nested_offset) if double_quant else 0.0, code, pairs, indices, values, out, n, k,
        BS=int(blocksize), BLOCK=block, DOUBLE_QUANT=double_quant, NESTED=NESTED_BLOCKSIZE,
        PT=pt, S=cfg.get("probes", SEARCH_PROBES), BIG=big,
        EMU=interpreting(), TRANSPOSED=_TRANSPOSED, GB=gb, PERSISTENT=cfg["persistent"] > 0, EVICT=cfg["evict"],
        STORE=cfg["store"], PAIRS=cfg["decode"] == "pairs", num_warps=cfg["num_warps"], enable_fp_fusion=False)


@register_kernel("nf4_quantize", "triton")
def nf4_quantize(weight, blocksize):
    n = weight.numel()
    nblocks = (n + blocksize - 1) // blocksize
    packed = torch.empty(n // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=weight.device)
    if n == 0:
        return packed, absmax
    _, mid, _ = _tables(weight.device)
    rows = max(1, _CONFIG_OVERRIDE.get("quant_elements", QUANT_ELEMENTS) // blocksize)
    big = (nblocks + rows) * blocksize >= _INT32_SAFE
    _nf4_quantize_kernel[(triton.cdiv(nblocks, rows),)](
        weight, mid, packed, absmax, n, nblocks, BS=int(blocksize), ROWS=rows, BIG=big, TINY_BITS=_TINY_BITS, EMU=interpreting(),
        num_warps=4 if rows * blocksize <= 4096 else 8)
    return packed, absmax
