"""fp8 delta gradient on Hopper (backend "triton"): a Triton quantize-and-transpose of each operand into
e4m3 codes, then cuBLASLt fp8 GEMMs (``torch._scaled_mm``, fp32 accumulation, per-row/per-column scales)
over bounded row bands of [out, in], each band's requested entries gathered. Never forms [out, in].

Bytes (T tokens): each operand is read twice (column amax, then quantize) and written once in fp8
(1 byte/element, transposed so the GEMM's reduction dimension T is contiguous): ~5 B per operand element,
against the 2 * T * out * in fp8 FLOPs of the bands (about twice the bf16 rate).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dispatch import register_kernel
from ...sddmm_fp8 import E4M3_MAX, column_scales

BAND_BYTES = 64 << 20  # bf16 band buffer: rows per band = BAND_BYTES / (2 * padded in_features)
_ALIGN = 16            # fp8 GEMM operands: every dimension a multiple of 16


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@triton.jit
def _quantize_transpose_kernel(src_ptr, inv_ptr, dst_ptr, T, n, T_pad,
                               BT: tl.constexpr, BN: tl.constexpr, FP8_MAX: tl.constexpr):
    """dst[c, t] = e4m3(clamp(src[t, c] * inv[c])) for a [BT x BN] tile; zero where t >= T (padding)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_n * BN + tl.arange(0, BN)
    t64 = t.to(tl.int64)
    inside = (t[:, None] < T) & (c[None, :] < n)
    x = tl.load(src_ptr + t64[:, None] * n + c[None, :], mask=inside, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + c, mask=c < n, other=0.0)
    q = tl.minimum(tl.maximum(x * inv[None, :], -FP8_MAX), FP8_MAX).to(dst_ptr.dtype.element_ty)
    store = (t[:, None] < T_pad) & (c[None, :] < n)
    tl.store(dst_ptr + c.to(tl.int64)[None, :] * T_pad + t64[:, None], q, mask=store)


def quantize_transposed(x: torch.Tensor, scales: torch.Tensor, rows_pad: int, T_pad: int) -> torch.Tensor:
    """e4m3 [rows_pad, T_pad] = quantized ``x.T`` (x: [T, n]); padding rows/columns are 0."""
    T, n = x.shape
    out = torch.empty(rows_pad, T_pad, dtype=torch.float8_e4m3fn, device=x.device)
    if rows_pad > n:
        out[n:].zero_()
    inv = (1.0 / scales).contiguous()
    BT, BN = 64, 64
    grid = (triton.cdiv(T_pad, BT), triton.cdiv(n, BN))
    _quantize_transpose_kernel[grid](x, inv, out, T, n, T_pad, BT=BT, BN=BN, FP8_MAX=E4M3_MAX, num_warps=4)
    return out


def band_rows_fp8(in_pad: int) -> int:
    return max(_ALIGN, (BAND_BYTES // (2 * in_pad)) // _ALIGN * _ALIGN)


@register_kernel("sddmm_fp8", "triton")
def sddmm_fp8(grad_output, input, indices, out_features, in_features):
    k = indices.numel()
    result = torch.zeros(k, dtype=torch.float32, device=grad_output.device)
    if k == 0 or grad_output.shape[0] == 0:
        return result
    if grad_output.device.type != "cuda" or torch.cuda.get_device_capability(grad_output.device) < (8, 9):
        from ..reference.sddmm_fp8 import sddmm_fp8 as reference  # no fp8 tensor cores: emulate

        return reference(grad_output, input, indices, out_features, in_features)
    T = grad_output.shape[0]
    T_pad, out_pad, in_pad = _round_up(T, _ALIGN), _round_up(out_features, _ALIGN), _round_up(in_features, _ALIGN)
    s_g, s_x = column_scales(grad_output), column_scales(input)
    g_t = quantize_transposed(grad_output, s_g, out_pad, T_pad)   # [out_pad, T_pad], T contiguous
    x_t = quantize_transposed(input, s_x, in_pad, T_pad)          # [in_pad, T_pad]
    scale_g = torch.ones(out_pad, dtype=torch.float32, device=s_g.device)
    scale_g[:out_features] = s_g
    scale_x = torch.ones(1, in_pad, dtype=torch.float32, device=s_x.device)
    scale_x[0, :in_features] = s_x
    idx = indices.long()
    rows = torch.div(idx, in_features, rounding_mode="floor")
    cols = idx - rows * in_features
    band = band_rows_fp8(in_pad)
    band_of = torch.div(rows, band, rounding_mode="floor")
    for r0 in range(0, out_features, band):
        r1 = min(out_pad, r0 + band)
        prod = torch._scaled_mm(g_t[r0:r1], x_t.t(), scale_a=scale_g[r0:r1].unsqueeze(1), scale_b=scale_x,
                                out_dtype=torch.bfloat16, use_fast_accum=False)
        local = ((rows - r0) * in_pad + cols).clamp_(0, prod.numel() - 1)
        picked = prod.view(-1).index_select(0, local).float()
        result = torch.where(band_of == r0 // band, picked, result)
    return result
