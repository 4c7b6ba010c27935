"""Triton NF4 kernels (backend "triton"): fused dequantize + sparse delta, and blockwise quantize.

``nf4_dequantize_add_delta``: each program owns ``BLOCK`` contiguous output elements, handled as groups of
GB packed bytes (GB = 4 for 16-bit outputs, 2 for fp32: 16 output bytes per group). Per group: one absmax
(decoded from the uint8 + nested state when double-quantized); per byte: split the nibbles, look both codes
up in the 16-entry table (an L1-resident gather), multiply by the absmax in fp32, interleave high/low back
into element order -- a thread then holds exactly one 16-byte store -- and store the chunk once. The sparse
delta uses the same scheme as the merge (see merge.py): k-ary search of the chunk's index range, dense
store, CTA barrier, then ``out[i] = round(fp32(code * absmax) + fp32(v))`` at the chunk's delta positions.
All arithmetic is separate fp32 multiply/add (compiled with ``enable_fp_fusion=False``: no FMA
contraction), so the result is bit-identical to the reference.

``nf4_quantize``: each program owns whole absmax blocks ([ROWS, blocksize] tile): per-block max |w|,
``scaled = clamp(w * (1 / max(absmax, 1e-38)), -1, 1)`` (IEEE reciprocal ``div_rn``, as the reference), code =
number of the 15 NF4 midpoints strictly below ``scaled`` (``torch.bucketize(right=False)``), two codes per
byte, first element in the high nibble.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ....quant.nf4 import NESTED_BLOCKSIZE, NF4_CODE
from ..._dispatch import register_kernel
from .merge import _INT32_SAFE, SEARCH_PROBES, _lower_bound, interpreting, round_to, to_f32

# output element size -> (output elements per program, warps); tests override through _CONFIG_OVERRIDE,
# benchmarks/bench_forward.py --tune sweeps them.
# 16 KiB of output per program; 8 warps: 58 (16-bit out) / 40 (fp32 out) registers on sm_90, 4 CTAs = 1024
# threads per SM (4 warps would hold twice the values per thread: 116 registers, half the threads)
DEQUANT_CONFIG = {
    2: (8192, 8),
    4: (4096, 8),
}
PATCH_TILE = 256
QUANT_ELEMENTS = 4096  # weight elements per program of the quantize kernel (at least one absmax block)
_CONFIG_OVERRIDE: dict = {}

# Triton 3.6 wants the transposed group tile (see the kernel); 3.7+ the row-major one
_TRANSPOSED = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
_TINY_BITS = int(torch.tensor(1e-38, dtype=torch.float32).view(torch.int32))  # the reference's clamp bound
_TABLES: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """NF4 code table and its 15 midpoints on ``device`` (cached; midpoints computed as the reference does)."""
    key = (device.type, device.index if device.index is not None else -1)
    if key not in _TABLES:
        code = NF4_CODE.to(device)
        _TABLES[key] = (code, ((code[:-1] + code[1:]) / 2).contiguous())
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


@triton.jit(do_not_specialize=["k"])
def _nf4_dequant_delta_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, code_ptr,
                              idx_ptr, val_ptr, out_ptr, n, k,
                              BS: tl.constexpr, BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                              NESTED: tl.constexpr, PT: tl.constexpr, S: tl.constexpr, BIG: tl.constexpr,
                              EMU: tl.constexpr, TRANSPOSED: tl.constexpr):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    GB: tl.constexpr = 64 // out_ty.primitive_bitwidth  # packed bytes per group = 16 output bytes (bf16: 4)
    NG: tl.constexpr = BLOCK // (2 * GB)                 # groups per program
    pid = tl.program_id(0)
    if BIG:
        start = pid.to(tl.int64) * BLOCK
        lo = tl.zeros((), dtype=tl.int64)
        kk = k.to(tl.int64)
    else:
        start = pid * BLOCK
        lo = tl.zeros((), dtype=tl.int32)
        kk = k
    # The chunk as NG groups of GB packed bytes: a thread holds whole groups, so after splitting the nibbles
    # and interleaving them it holds 16 consecutive output bytes = exactly one 16-byte store, the layout the
    # store wants (16-byte packed vectors would need a shared-memory shuffle before the store). The code
    # table gathers must get the same layout as the packed load: Triton >= 3.7 gives it to a [NG, GB] tile,
    # 3.6 (whose coalescing orders a gather's dims 0-first) to the transposed [GB, NG] tile.
    g = tl.arange(0, NG)
    gstart = start + g * (2 * GB)                                      # first element of each group
    if TRANSPOSED:
        byte = (gstart // 2)[None, :] + tl.arange(0, GB)[:, None]    # [GB, NG]
        p = tl.load(packed_ptr + byte, mask=byte < n // 2, other=0)
        gs = gstart[None, :]
        scale = _absmax_f32(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, gs // BS, gs < n,
                            DOUBLE_QUANT, NESTED)                      # [1, NG] fp32 absmax of each group
        hi_v = tl.load(code_ptr + (p >> 4).to(tl.int32)) * scale
        lo_v = tl.load(code_ptr + (p & 0xF).to(tl.int32)) * scale
        vals = tl.reshape(tl.permute(tl.join(hi_v, lo_v), (1, 0, 2)), (NG, 2 * GB))
    else:
        byte = (gstart // 2)[:, None] + tl.arange(0, GB)[None, :]    # [NG, GB]
        p = tl.load(packed_ptr + byte, mask=byte < n // 2, other=0)
        gs = gstart[:, None]
        scale = _absmax_f32(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, gs // BS, gs < n,
                            DOUBLE_QUANT, NESTED)                      # [NG, 1] fp32 absmax of each group
        hi_v = tl.load(code_ptr + (p >> 4).to(tl.int32)) * scale
        lo_v = tl.load(code_ptr + (p & 0xF).to(tl.int32)) * scale
        vals = tl.reshape(tl.join(hi_v, lo_v), (NG, 2 * GB))          # element order: 2p high, 2p+1 low
    offs = gstart[:, None] + tl.arange(0, 2 * GB)[None, :]
    lo = _lower_bound(idx_ptr, lo, kk, start, S)
    hi = _lower_bound(idx_ptr, lo, tl.minimum(kk, lo + BLOCK), start + BLOCK, S)
    tl.store(out_ptr + offs, round_to(vals, out_ty, EMU), mask=offs < n)
    if hi > lo:
        tl.debug_barrier()  # this CTA's dense stores are ordered before its patch stores
        for j0 in range(lo, hi, PT):
            j = j0 + tl.arange(0, PT)
            m = j < hi
            i = tl.load(idx_ptr + j, mask=m, other=0)
            v = tl.load(val_ptr + j, mask=m, other=0)
            b = tl.load(packed_ptr + i // 2, mask=m, other=0).to(tl.int32)
            q = tl.where((i % 2) == 0, b >> 4, b & 0xF)
            s = _absmax_f32(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, i // BS, m,
                            DOUBLE_QUANT, NESTED)
            merged = tl.load(code_ptr + q) * s + to_f32(v, EMU)  # fp32 product, then fp32 add (no FMA)
            tl.store(out_ptr + i, round_to(merged, out_ty, EMU), mask=m)


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


def dequant_config(dtype: torch.dtype) -> tuple:
    """(output elements per program, warps) of the fused dequantize for an output dtype."""
    block, warps = DEQUANT_CONFIG[dtype.itemsize]
    return _CONFIG_OVERRIDE.get("block", block), _CONFIG_OVERRIDE.get("num_warps", warps)


@register_kernel("nf4_dequantize_add_delta", "triton")
def nf4_dequantize_add_delta(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                             indices, values, out) -> None:
    n = out.numel()
    k = indices.numel()
    if n == 0:
        return
    code, _ = _tables(out.device)
    double_quant = absmax.dtype == torch.uint8
    block, warps = dequant_config(out.dtype)
    big = n + block >= _INT32_SAFE or k + block >= _INT32_SAFE
    _nf4_dequant_delta_kernel[(triton.cdiv(n, block),)](
        packed, absmax, nested_absmax if double_quant else absmax, nested_code if double_quant else code,
        float(nested_offset) if double_quant else 0.0, code, indices, values, out, n, k,
        BS=int(blocksize), BLOCK=block, DOUBLE_QUANT=double_quant, NESTED=NESTED_BLOCKSIZE,
        PT=_CONFIG_OVERRIDE.get("patch_tile", PATCH_TILE), S=_CONFIG_OVERRIDE.get("probes", SEARCH_PROBES),
        BIG=big, EMU=interpreting(), TRANSPOSED=_TRANSPOSED, num_warps=warps,
        enable_fp_fusion=False)


@register_kernel("nf4_quantize", "triton")
def nf4_quantize(weight, blocksize):
    n = weight.numel()
    nblocks = (n + blocksize - 1) // blocksize
    packed = torch.empty(n // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=weight.device)
    if n == 0:
        return packed, absmax
    _, mid = _tables(weight.device)
    rows = max(1, _CONFIG_OVERRIDE.get("quant_elements", QUANT_ELEMENTS) // blocksize)
    big = (nblocks + rows) * blocksize >= _INT32_SAFE
    _nf4_quantize_kernel[(triton.cdiv(nblocks, rows),)](
        weight, mid, packed, absmax, n, nblocks, BS=int(blocksize), ROWS=rows, BIG=big, TINY_BITS=_TINY_BITS, EMU=interpreting(),
        num_warps=4 if rows * blocksize <= 4096 else 8)
    return packed, absmax
