"""Reference fp8 delta gradient: the quantization of ``spiel::sddmm_fp8`` emulated exactly in fp32.

Quantize each operand column-wise to e4m3 (torch's RTNE cast, after clamping to +-448), dequantize to fp32,
take the chunked gather-dot of the reference ``sddmm`` and round the scaled result through bf16, as the
fast path's bf16 GEMM output does. Memory: the fp32 dequantized operands, O(T * (out + in)).
"""
import torch

from ..._dispatch import register_kernel
from ...sddmm_fp8 import E4M3_MAX, column_scales
from .sddmm import sddmm as _sddmm_reference


def quantize_columns(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of ``x / scales`` (per column), as fp32 (the exact values the fp8 GEMM multiplies)."""
    q = (x.float() * (1.0 / scales)).clamp_(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn).float()


@register_kernel("sddmm_fp8", "torch")
def sddmm_fp8(grad_output, input, indices, out_features, in_features):
    s_g, s_x = column_scales(grad_output), column_scales(input)
    q_g, q_x = quantize_columns(grad_output, s_g), quantize_columns(input, s_x)
    dots = _sddmm_reference(q_g, q_x, indices, out_features, in_features, None)
    idx = indices.long()
    rows = torch.div(idx, in_features, rounding_mode="floor")
    scaled = dots * s_g[rows] * s_x[idx - rows * in_features]
    return scaled.to(torch.bfloat16).float()
