"""torch.distributed helpers of the SpIEL scheduler (all no-ops in a single process)."""
from __future__ import annotations

from typing import List, Tuple

import torch


def world(group=None) -> Tuple[int, int]:
    """(world size, rank) of ``group`` or (1, 0) when torch.distributed is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def _src(group) -> int:
    if group is None:
        return 0
    return torch.distributed.get_global_rank(group, 0)


def sum_consensus(flat: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce (sum) then broadcast rank 0's result: every rank ends with bit-identical values even where a
    backend's reduction order could differ between ranks. In place; returns ``flat``."""
    if world(group)[0] > 1:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        torch.distributed.broadcast(flat, src=_src(group), group=group)
    return flat


def max_consensus(flat: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce (max, exact) in place; returns ``flat``."""
    if world(group)[0] > 1:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX, group=group)
    return flat


def all_gather_stack(t: torch.Tensor, group=None) -> torch.Tensor:
    """[W, *t.shape] of every rank's ``t`` (same shape on every rank)."""
    size, _ = world(group)
    if size == 1:
        return t.unsqueeze(0)
    parts: List[torch.Tensor] = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def same_on_all_ranks(t: torch.Tensor, group=None) -> bool:
    """Whether ``t`` is identical on every rank (a collective: call on every rank)."""
    stacked = all_gather_stack(t, group)
    return bool((stacked == stacked[:1]).all())
