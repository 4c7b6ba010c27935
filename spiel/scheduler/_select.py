"""Selection primitives of the SpIEL scheduler, all deterministic (ties by the smaller flat position) and
without host syncs.

- :func:`top_gradient_entries`: SpIEL-AG candidate selection. The top-c ``|grad_output^T @ input|`` positions
  outside the active indices, computed in row blocks of the dense gradient with a running top-c: memory
  O(c + block), never out x in.
- :func:`merge_top`: merge two (position, score) sets into the best c.
- :func:`union_top`: rank-consistent union of per-rank candidate sets (distributed AG).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["top_gradient_entries", "merge_top", "union_top"]

_LOW32 = (1 << 32) - 1


def merge_top(pos: torch.Tensor, score: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest ``score`` among ``pos`` (int64, ASCENDING, unique), ties by smaller
    position; returned sorted by position."""
    if pos.numel() > k:
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        order = torch.sort(order).values  # back to ascending position (pos is ascending)
        pos, score = pos.index_select(0, order), score.index_select(0, order)
    return pos, score


def _block_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Local positions of the k largest of ``scores`` (fp32, >= 0 or exactly -1 for excluded), ties by smaller
    position, as a sorted int64 tensor. One ``topk`` over unique int64 keys (score bits, then position), so the
    result does not depend on how ``topk`` breaks ties."""
    n = scores.numel()
    bits = scores.view(torch.int32).to(torch.int64)  # monotone in the score for scores >= 0 (and -1 lowest)
    key = (bits << 32) | (_LOW32 - torch.arange(n, device=scores.device, dtype=torch.int64))
    top = torch.topk(key, k, sorted=False).indices
    return torch.sort(top).values


@torch.no_grad()
def top_gradient_entries(grad_output: torch.Tensor, input: torch.Tensor, exclude: Optional[torch.Tensor], k: int,
                         block_elements: int = 1 << 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` positions of ``|grad_output^T @ input|`` (the dense weight gradient, fp32) that are not in
    ``exclude``.

    Args:
        grad_output: [T, out]; input: [T, in] (any float dtype; blocks are computed in fp32).
        exclude: sorted unique int32/int64 flat positions never returned (the active indices), or None.
        k: how many to return; at most ``out * in - len(exclude)``.
        block_elements: the gradient is formed ``max(1, block_elements // in)`` rows at a time.
    Returns ``(positions int64 [k] ascending, |grad| fp32 [k])``. Memory O(k + len(exclude) + block); no host
    sync. NaN gradients count as 0.
    """
    out_f, in_f = grad_output.shape[1], input.shape[1]
    device = grad_output.device
    rows_per_block = max(1, int(block_elements) // max(in_f, 1))
    if rows_per_block * in_f >= (1 << 32):
        raise ValueError("a gradient block must have fewer than 2**32 elements: lower block_elements")
    x32 = input if input.dtype == torch.float32 else input.float()
    excl = None if exclude is None or exclude.numel() == 0 else exclude.to(torch.int64)
    best_pos = torch.empty(0, dtype=torch.int64, device=device)
    best_score = torch.empty(0, dtype=torch.float32, device=device)
    if k == 0:
        return best_pos, best_score
    for r0 in range(0, out_f, rows_per_block):
        r1 = min(out_f, r0 + rows_per_block)
        go = grad_output[:, r0:r1]
        go = go if go.dtype == torch.float32 else go.float()
        block = torch.mm(go.t(), x32).abs_().view(-1)
        torch.nan_to_num_(block, nan=0.0)
        n = block.numel()
        base = r0 * in_f
        if excl is not None:
            local = excl - base
            inside = (local >= 0) & (local < n)
            # out-of-block positions go to a sentinel slot n (dropped right after)
            block = torch.cat([block, block.new_zeros(1)])
            block.index_fill_(0, torch.where(inside, local, torch.full_like(local, n)), -1.0)
            block = block[:n]
        local_top = _block_top(block, min(k, n))
        pos = torch.cat([best_pos, local_top + base])
        score = torch.cat([best_score, block.index_select(0, local_top)])
        best_pos, best_score = merge_top(pos, score, k)
    return best_pos, best_score


@torch.no_grad()
def union_top(positions: torch.Tensor, scores: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """Rank-consistent candidate set from every rank's candidates.

    Args:
        positions: int64 [W, c] each rank's candidate positions (-1 where a rank has none); scores: [W, c]
            their |gradient| on that rank.
        k: how many to keep.
    Returns the sorted int64 positions of the k largest summed scores over the union (ties by smaller position),
    or None when no rank has candidates. Identical inputs give identical outputs (no atomics: each rank's
    scores are written to their own row, then summed). Host syncs (call once per selection window).
    """
    valid = positions >= 0
    if not bool(valid.any()):
        return None
    pos = positions.masked_fill(~valid, -1)
    uniq, inverse = torch.unique(pos, sorted=True, return_inverse=True)
    table = torch.zeros(pos.shape[0], uniq.numel(), dtype=torch.float64, device=pos.device)
    table.scatter_(1, inverse, scores.double().masked_fill(~valid, 0.0))
    total = table.sum(0)
    total = total.masked_fill(uniq < 0, float("-inf"))
    n_valid = int((uniq >= 0).sum())
    order = torch.sort(total, descending=True, stable=True).indices[:min(k, n_valid)]
    return torch.sort(uniq.index_select(0, order)).values
