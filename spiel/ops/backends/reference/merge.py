"""Reference (pure PyTorch) delta merge."""
import torch

from ..._dispatch import register_kernel


@register_kernel("merge_delta", "torch")
def merge_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    flat_out = out.view(-1)
    if out.data_ptr() != weight.data_ptr():
        flat_out.copy_(weight.reshape(-1))
    if indices.numel() == 0:
        return
    idx = indices.long()
    # fp32 sum of the original weight and the delta, one rounding to weight's dtype
    merged = weight.reshape(-1).index_select(0, idx).to(acc) + values.to(acc)
    flat_out.index_copy_(0, idx, merged.to(out.dtype))
