"""Reference (pure PyTorch) drop + regrow of an index update (``spiel.ops.drop_regrow_indices``): a stable sort of
every row by |value|, then a merge of the kept and regrown positions by ``searchsorted`` and scatters."""
import torch

from ..._dispatch import register_kernel
from ..._rows import top_abs_rows


@register_kernel("drop_regrow_indices", "torch")
@torch.no_grad()
def drop_regrow_indices(values, indices, regrown):
    L, n = regrown.shape
    k = values[0].numel()
    device = regrown.device
    old = torch.stack(list(indices))
    if n == 0:
        return old.clone(), torch.arange(k, device=device).expand(L, k).contiguous()
    keep = k - n
    # by |value| descending in fp32 (NaN first), ties by the smaller slot (stable): the first k - n stay, ascending
    kept_slots = top_abs_rows(torch.stack([v.detach().float() for v in values]), keep, ascending=True)
    kept = old.to(torch.int64).gather(1, kept_slots)
    # merged slot of an element: its rank in its own row plus the other row's elements below it
    slot_kept = torch.arange(keep, device=device) + torch.searchsorted(regrown, kept)
    slot_regrown = torch.arange(n, device=device) + torch.searchsorted(kept, regrown)
    new_indices = torch.empty(L, k, dtype=torch.int64, device=device)
    new_indices.scatter_(1, slot_kept, kept).scatter_(1, slot_regrown, regrown)
    order = torch.empty(L, k, dtype=torch.int64, device=device)
    order.scatter_(1, slot_kept, kept_slots).scatter_(1, slot_regrown, -1)
    return new_indices.to(old.dtype), order
