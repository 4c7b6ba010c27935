"""Grouping many layers' work into batches of bounded size (shared by spiel.nn and spiel.scheduler)."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Hashable, List, Sequence, TypeVar

T = TypeVar("T")


def group_batches(items: Sequence[T], key: Callable[[T], Hashable], size: Callable[[T], int],
                  budget: int) -> List[List[T]]:
    """``items`` grouped by ``key`` (first-seen order, item order kept inside a group), each group cut into
    consecutive batches of at most ``budget`` total ``size`` (a larger item forms a batch of its own)."""
    groups: Dict[Hashable, List[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    out: List[List[T]] = []
    for members in groups.values():
        cur, total = [], 0
        for item in members:
            if cur and total + size(item) > budget:
                out.append(cur)
                cur, total = [], 0
            cur.append(item)
            total += size(item)
        out.append(cur)
    return out
