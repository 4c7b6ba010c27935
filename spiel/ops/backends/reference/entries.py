"""Reference (pure PyTorch) entry scatter/gather over lists: the loops ``spiel.ops.index_put_many_`` and
``spiel.ops.index_select_many`` stand for."""
import torch

from ..._dispatch import register_kernel


@register_kernel("index_put_many", "torch")
@torch.no_grad()
def index_put_many(dense, indices, values) -> None:
    for d, idx, v in zip(dense, indices, values):
        if idx.numel():
            d.view(-1).index_put_((idx,), v)


@register_kernel("index_select_many", "torch")
@torch.no_grad()
def index_select_many(dense, indices, out) -> None:
    for d, idx, o in zip(dense, indices, out):
        if idx.numel():
            torch.index_select(d.view(-1), 0, idx, out=o)
