"""Selection primitives of the SpIEL scheduler, all deterministic (ties by the smaller flat position) and
without host syncs.

- :func:`top_gradient_entries`: SpIEL-AG candidate selection. The top-c ``|grad_output^T @ input|`` positions
  outside the active indices, computed in row blocks of the dense gradient, each reduced by
  ``spiel.ops.select_topk_abs``, with a running top-c: memory O(c + block), never out x in.
- :func:`segmented_topk_abs`: the top-n_i ``|score|`` positions of many 1-D tensors at once (one sort).
- :func:`merge_top`: merge two (position, score) sets into the best c.
- :func:`union_top`: rank-consistent union of per-rank candidate sets (distributed AG).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

# row-wise helpers shared with spiel.ops' reference backends (which must not import the scheduler)
from ..ops._rows import chosen_ascending as _chosen_ascending
from ..ops._rows import device_tensor, rank_rows as _rank_rows, top_abs_rows, true_positions

__all__ = ["top_gradient_entries", "segmented_topk_abs", "top_abs_rows", "merge_top", "union_top",
           "true_positions", "device_tensor"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ small tools
def _uses_low_precision_gemm(grad_output: torch.Tensor, input: torch.Tensor) -> bool:
    """Whether the probe's gradient blocks come from the bf16/fp16 GEMM (CUDA, same dtypes: fp32 accumulation,
    the block stored in that dtype); otherwise the inputs are upcast to fp32 (always on CPU)."""
    return grad_output.is_cuda and grad_output.dtype in _LOW_PRECISION and input.dtype == grad_output.dtype


# ------------------------------------------------------------------------------------------------ merging
def merge_top(pos: torch.Tensor, score: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest ``score`` among ``pos`` (int64, ASCENDING, unique), ties by smaller
    position; returned sorted by position."""
    if pos.numel() > k:
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        order = torch.sort(order).values  # back to ascending position (pos is ascending)
        pos, score = pos.index_select(0, order), score.index_select(0, order)
    return pos, score


@torch.no_grad()
def top_gradient_entries(grad_output: torch.Tensor, input: torch.Tensor, exclude: Optional[torch.Tensor], k: int,
                         block_elements: int = 1 << 26, *, gather: Optional[torch.Tensor] = None) -> Tuple:
    """Top-``k`` positions of ``|grad_output^T @ input|`` (the dense weight gradient, fp32) that are not in
    ``exclude``.

    Args:
        grad_output: [T, out]; input: [T, in] (any float dtype; on CUDA with both bf16 or both fp16, the
            blocks come from that dtype's GEMM, fp32-accumulated and rounded to the dtype: half the bytes of
            an fp32 block to write and to select from, and the block's memory halved; the ranking is then
            that of the rounded magnitudes, ties by position; otherwise, and on CPU, fp32).
        exclude: sorted unique int32/int64 flat positions never returned (the active indices), or None.
        k: how many to return; at most ``out * in - len(exclude)``.
        block_elements: the gradient is formed ``max(1, block_elements // in)`` rows at a time.
        gather: optional int32/int64 flat positions (e.g. the active indices) whose gradient is read from the
            blocks as they pass: returned as a third element, fp32 [len(gather)] (the blocks' values: rounded to
            bf16/fp16 on the low-precision path below), so a caller that needs both skips its own GEMM.
    Returns ``(positions int64 [k] ascending, |grad| fp32 [k])`` (and the gathered gradient), ties by the smaller
    position. Memory O(k + len(exclude) + len(gather) + block); no host sync. NaN gradients count as 0 (and +-inf
    as the largest float).
    Why a rounded ranking is enough: rounding only reorders entries within one bf16 step (2**-8 relative) of
    each other, and with several candidates per slot their exact gradients are then accumulated over the AG
    window (with one per slot, the default, this ranking decides which positions regrow).
    """
    if grad_output.dim() != 2 or input.dim() != 2 or grad_output.shape[0] != input.shape[0]:
        raise ValueError(f"grad_output [T, out] and input [T, in] must be 2-D with the same T, got "
                         f"{tuple(grad_output.shape)} and {tuple(input.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise TypeError(f"k must be a non-negative int, got {k!r}")
    out_f, in_f = grad_output.shape[1], input.shape[1]
    n_excl = 0 if exclude is None else exclude.numel()
    if k > out_f * in_f - n_excl:
        raise ValueError(f"k={k} is more than the {out_f * in_f - n_excl} positions outside exclude")
    device = grad_output.device
    rows_per_block = min(out_f, max(1, int(block_elements) // max(in_f, 1)))
    block_n = rows_per_block * in_f
    if block_n >= (1 << 31):
        raise ValueError("a gradient block must have fewer than 2**31 elements: lower block_elements")
    if gather is not None and (not isinstance(gather, torch.Tensor) or gather.dim() != 1
                               or gather.dtype not in (torch.int32, torch.int64)):
        raise TypeError("gather must be a 1-D int32/int64 tensor of flat positions")
    if k == 0 and gather is None:
        return (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device))
    gathered = None if gather is None else torch.zeros(gather.numel(), dtype=torch.float32, device=device)
    low_precision = _uses_low_precision_gemm(grad_output, input)
    x = input if low_precision or input.dtype == torch.float32 else input.float()  # upcast once, not per block
    # one gradient buffer for every block; the selection op reads it (|.|, NaN as 0, the active indices of the
    # block ranked last) without writing it: on CUDA a radix select of three streaming passes (bf16/fp16 blocks), no host sync
    buf = torch.empty(block_n, dtype=grad_output.dtype if low_precision else torch.float32, device=device)
    tops_pos, tops_score, pending = [], [], 0
    for r0 in range(0, out_f, rows_per_block):
        r1 = min(out_f, r0 + rows_per_block)
        n = (r1 - r0) * in_f
        block = buf[:n]
        go = grad_output[:, r0:r1]
        if low_precision:
            torch.mm(go.t(), x, out=block.view(r1 - r0, in_f))
        else:
            torch.mm((go if go.dtype == torch.float32 else go.float()).t(), x, out=block.view(r1 - r0, in_f))
        if gathered is not None and gather.numel():
            if r0 == 0 and r1 == out_f:  # one block holds the whole gradient (7B layers at 2**26): one gather
                gathered = block.index_select(0, gather).float()
            else:  # the positions inside this block, masked (no host sync); the probe step is launch-bound
                local = gather.long() - r0 * in_f
                inside = (local >= 0) & (local < n)
                gathered = torch.where(inside, block.index_select(0, local.clamp_(0, n - 1)).float(), gathered)
        if k == 0:
            continue
        # a block with fewer than k entries outside exclude returns some excluded ones at -inf: the merge
        # below never keeps them (k <= out * in - len(exclude) in all)
        local_top, local_score = torch.ops.spiel.select_topk_abs(block, min(k, n), exclude, r0 * in_f)
        tops_pos.append(local_top + r0 * in_f if r0 else local_top)
        tops_score.append(local_score)
        pending += local_top.numel()
        if pending > 4 * k and len(tops_pos) > 1:  # bound the kept candidates: O(k) memory
            merged = merge_top(torch.cat(tops_pos), torch.cat(tops_score), k)
            tops_pos, tops_score, pending = [merged[0]], [merged[1]], merged[0].numel()
    if k == 0:
        top = (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device))
    elif len(tops_pos) == 1:
        top = (tops_pos[0], tops_score[0])
    else:
        top = merge_top(torch.cat(tops_pos), torch.cat(tops_score), k)
    return top if gathered is None else (*top, gathered)


# ------------------------------------------------------------------------------------------------ segmented top-k
def segmented_topk_abs(scores: Sequence[torch.Tensor], counts: Sequence[int], *,
                       ascending: bool = False) -> List[torch.Tensor]:
    """For every 1-D tensor ``scores[i]``, the positions (int64) of its ``counts[i]`` largest ``|score|``, ties
    by the smaller position: ``topk_abs(scores[i], counts[i])`` for all i with one sort (no host sync).

    Args:
        scores: 1-D float tensors on one device (any float dtype; compared in fp32 like ``topk_abs``; NaN counts
            as the largest).
        counts: host ints, ``0 <= counts[i] <= len(scores[i])``.
        ascending: return each segment's positions in ascending order instead of by rank.
    Returns a list of int64 tensors (views of one buffer). Memory O(L * max len).
    """
    if len(scores) != len(counts):
        raise ValueError(f"scores and counts must have the same length, got {len(scores)} and {len(counts)}")
    if not scores:
        return []
    device = scores[0].device
    for i, (s, c) in enumerate(zip(scores, counts)):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() != 1:
            raise TypeError(f"scores[{i}] must be a 1-D floating-point tensor")
        if s.device != device:
            raise ValueError(f"scores must be on one device, got {device} and {s.device}")
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= s.numel():
            raise ValueError(f"counts[{i}] must be an int in [0, {s.numel()}], got {c!r}")
    L = len(scores)
    if len({s.numel() for s in scores}) == 1:
        magnitudes = torch.stack([s.detach() for s in scores]).float().abs_()
    else:  # ragged: pad with -1, below every magnitude
        magnitudes = torch.nn.utils.rnn.pad_sequence([s.detach().float().abs() for s in scores],
                                                     batch_first=True, padding_value=-1.0)
    width = magnitudes.shape[1]
    order = _rank_rows(magnitudes)
    if not ascending:
        return [order[i, :c] for i, c in enumerate(counts)]
    flat = _chosen_ascending(order, counts)
    total = sum(counts)
    local = flat - torch.repeat_interleave(torch.arange(L, device=device) * width,
                                           device_tensor(counts, device), output_size=total)
    return list(local.split(list(counts)))


# ------------------------------------------------------------------------------------------------ distributed
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
