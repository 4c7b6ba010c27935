"""Reference (pure PyTorch) delta gradient, in chunks of entries so memory stays O(k + chunk)."""
import torch

from ..._dispatch import register_kernel

_CHUNK = 1 << 12


@register_kernel("sddmm", "torch")
def sddmm(grad_output, input, indices, out_features, in_features, plan):
    acc = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    result = torch.empty(indices.numel(), dtype=acc, device=grad_output.device)
    idx = indices.long()
    for start in range(0, idx.numel(), _CHUNK):
        part = idx[start:start + _CHUNK]
        rows = grad_output.index_select(1, part // in_features).to(acc)
        cols = input.index_select(1, part % in_features).to(acc)
        result[start:start + part.numel()] = (rows * cols).sum(0)
    return result
