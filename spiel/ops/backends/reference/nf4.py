"""Reference (pure PyTorch) NF4 kernels."""
import torch

from ....quant.nf4 import NF4_CODE, dequantize_absmax, quantize_reference
from ..._dispatch import register_kernel


@register_kernel("nf4_dequantize_add_delta", "torch")
def nf4_dequantize_add_delta(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                             indices, values, out) -> None:
    n = out.numel()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    scale = dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)
    dense = NF4_CODE.to(packed.device)[codes] * scale.repeat_interleave(blocksize)[:n]  # fp32 product
    if indices.numel():
        dense.index_add_(0, indices.long(), values.float())
    out.view(-1).copy_(dense)


@register_kernel("nf4_quantize", "torch")
def nf4_quantize(weight, blocksize):
    return quantize_reference(weight, blocksize)
