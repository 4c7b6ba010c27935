"""SpIEL-MA regrowth for many layers at once: :func:`batched_topk_outer`, ``spiel.ops.topk_outer`` for layers
of one shape with a constant number of launches and one host sync per call.

For layer ``l`` with row scores ``R`` [m], column scores ``C`` [n] and active (excluded) positions ``E``, the
answer is the ``k`` largest ``R[r] * C[c]`` (exact: fp32 inputs multiply exactly in float64) over positions
outside ``E``, largest first, ties by the smaller position ``r * n + c``. As in the reference op, a position
is *above* ``tau`` when ``C[c] >= tau / R[r]`` (float64 division, ``R[r] > 0``); with the columns sorted in
descending order (rank ``q(c)``, ties by the smaller column), the positions of row ``r`` above ``tau`` are the
ranks ``[0, p_r(tau))``, ``p_r = #{c : C[c] >= tau / R[r]}`` (one ``searchsorted``), and an excluded ``(r, c)``
is above ``tau`` exactly when ``q(c) < p_r(tau)``. So, with the excluded positions keyed by ``r * n + q(c)``
and sorted once, the number of non-excluded positions above ``tau`` is ``sum_r p_r - #{excluded keys below
r * n + p_r}``: two ``searchsorted`` per threshold, exact and consistent with the candidate enumeration.

1. Multisection on ``tau`` (``spiel.ops.outer_threshold``: all layers at once, ``S`` thresholds per round, one
   launch per round with the Triton/CUDA kernels) for the largest ``tau`` with at least ``k`` non-excluded
   positions above it; then ``tau`` is relaxed by ``1e-12`` (relative). Every position that could be in the top
   ``k`` is then above ``tau``.
2. One host sync: the number of non-excluded candidates per layer (and which layers the fast path can take).
3. The j-th non-excluded rank of row ``r`` is ``j + #{s : e_s - s <= j}`` over that row's sorted excluded ranks
   ``e_s`` (one ``searchsorted`` on the keys minus their in-row offsets), so only non-excluded candidates are
   formed (about ``k`` per layer).
4. Exact float64 scores, one stable sort by score (the candidates are generated in (row, rank) order, i.e. ties
   come by position) then a stable sort by layer; each layer's first ``k`` are its answer.

A layer the fast path cannot take (non-finite or negative scores, fewer than ``k`` positive products outside
``E``, or ``k + len(E) >= m * n // 2`` where the reference streams) is answered by ``spiel.ops.topk_outer``.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from ..ops import topk_outer
from ..ops import _dispatch
from ..ops.outer import MAX_SECTIONS
from ._select import device_tensor

__all__ = ["batched_topk_outer"]

_BITS = 60           # resolution of the search, as the reference's 60 halvings
KERNEL_SECTIONS = 15  # thresholds per round with the Triton/CUDA outer_threshold (4 bits per launch)


def _check(rows, cols, counts, excludes):
    if not (len(rows) == len(cols) == len(counts) == len(excludes)):
        raise ValueError("rows, cols, counts and excludes must have the same length, got "
                         f"{len(rows)}, {len(cols)}, {len(counts)}, {len(excludes)}")
    if not rows:
        return
    m, n, device = rows[0].numel(), cols[0].numel(), rows[0].device
    for i, (r, c, k, e) in enumerate(zip(rows, cols, counts, excludes)):
        for name, t in (("rows", r), ("cols", c)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
                raise TypeError(f"{name}[{i}] must be a 1-D floating-point tensor")
        if r.numel() != m or c.numel() != n:
            raise ValueError(f"all layers must have the same shape: layer {i} has {r.numel()} x {c.numel()}, "
                             f"layer 0 {m} x {n}")
        if not isinstance(e, torch.Tensor) or e.dim() != 1 or e.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"excludes[{i}] must be a 1-D int32/int64 tensor")
        if r.device != device or c.device != device or e.device != device:
            raise ValueError(f"all tensors must be on one device ({device}); layer {i} is not")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= m * n - e.numel():
            raise ValueError(f"counts[{i}] must be an int in [0, {m * n - e.numel()}], got {k!r}")


@torch.no_grad()
def batched_topk_outer(rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor], counts: Sequence[int],
                       excludes: Sequence[torch.Tensor], *, ordered: bool = True) -> List[torch.Tensor]:
    """``[spiel.ops.topk_outer(rows[i], cols[i], counts[i], exclude=excludes[i]) for i ...]`` in one batch.

    Args:
        rows: [m] non-negative scores per layer (same m); cols: [n] per layer (same n); float dtypes (ranked
            exactly in float64 like the reference).
        counts: host ints, how many positions per layer.
        excludes: sorted unique int32/int64 flat positions per layer (may differ in length).
        ordered: False when only the set matters (then in no particular order; saves the ranking sorts when a
            layer has exactly ``counts[i]`` candidates).
    Returns int64 [counts[i]] per layer, largest product first, ties by the smaller position: exactly the
    reference op's answer. One host sync per call (plus the reference's for layers it falls back to); memory
    O(L * (m + n + len(exclude) + k)), never m x n.
    """
    _check(rows, cols, counts, excludes)
    results: List = [None] * len(rows)
    if not rows:
        return results
    m, n = rows[0].numel(), cols[0].numel()
    device = rows[0].device
    fast = []
    for i, (k, e) in enumerate(zip(counts, excludes)):
        if k == 0:
            results[i] = torch.empty(0, dtype=torch.int64, device=device)
        elif k + e.numel() >= (m * n) // 2:  # the reference streams here: so do we (per layer)
            results[i] = topk_outer(rows[i], cols[i], k, exclude=excludes[i])
        else:
            fast.append(i)
    if fast:
        got = _fast([rows[i] for i in fast], [cols[i] for i in fast], [counts[i] for i in fast],
                    [excludes[i] for i in fast], ordered)
        for i, res in zip(fast, got):
            results[i] = res if res is not None else topk_outer(rows[i], cols[i], counts[i], exclude=excludes[i])
    return results


def _fast(rows, cols, counts, excludes, ordered: bool) -> List:
    """The batched path; None for the layers it cannot answer."""
    L, m, n = len(rows), rows[0].numel(), cols[0].numel()
    device = rows[0].device
    i64, f64 = torch.int64, torch.float64
    R = torch.stack([r.detach() for r in rows]).to(f64)           # [L, m]
    C = torch.stack([c.detach() for c in cols]).to(f64)           # [L, n]
    col_sorted, col_order = torch.sort(C, dim=1, descending=True, stable=True)
    col_asc = col_sorted.flip(1).contiguous()
    rank_of_col = torch.empty_like(col_order).scatter_(
        1, col_order, torch.arange(n, device=device).expand(L, n).contiguous())
    mn = m * n

    # excluded positions keyed r * n + rank(c), sorted per layer; padded with mn (above every query)
    width = max(1, max(e.numel() for e in excludes))
    if all(e.numel() == width for e in excludes):
        E = torch.stack([e.to(i64) for e in excludes])
    else:
        E = torch.nn.utils.rnn.pad_sequence([e.to(i64) for e in excludes], batch_first=True, padding_value=-1)
        if E.shape[1] < width:
            E = torch.cat([E, E.new_full((L, width - E.shape[1]), -1)], 1)
    pad = E < 0
    E_row = torch.div(E, n, rounding_mode="floor").clamp_(min=0)
    E_col = (E - E_row * n).clamp_(min=0)
    key_dtype = torch.int32 if mn < 2**31 - 1 else i64           # fewer radix passes, same order
    keys = torch.where(pad, mn, E_row * n + rank_of_col.gather(1, E_col)).to(key_dtype)
    keys = torch.sort(keys, dim=1).values                          # [L, width]
    row_base = torch.arange(m + 1, device=device) * n              # [m + 1]
    row_start = torch.searchsorted(keys, row_base.to(key_dtype).expand(L, m + 1).contiguous())  # keys before row r
    R_pos = R > 0
    inf = torch.full((), float("inf"), dtype=f64, device=device)  # a fill, not a blocking host-to-device copy

    def above(tau: torch.Tensor):
        """tau [L, X] -> (p [L, X, m]: per-row counts above tau, excluded above tau per row [L, X, m])."""
        X = tau.shape[1]
        ratio = torch.where(R_pos[:, None, :], tau[:, :, None] / R[:, None, :], inf)
        p = n - torch.searchsorted(col_asc, ratio.view(L, X * m), side="left").view(L, X, m)
        q = (row_base[:m] + p).view(L, X * m).to(key_dtype)
        ex = torch.searchsorted(keys, q).view(L, X, m) - row_start[:, None, :m]
        return p, ex

    need = device_tensor(counts, device)
    ok = torch.isfinite(R).all(1) & torch.isfinite(C).all(1) & (R.amin(1) >= 0) & (C.amin(1) >= 0)
    hi = torch.where(ok, R.amax(1) * C.amax(1), 0.0)
    # thresholds per round. The reference backend runs ~15 launches per round, host-bound: many thresholds (63, 10
    # rounds at 7B), its temporaries (~32 B per row and threshold) within ~16 B per active delta. The kernels run one
    # launch per round whose work grows with the thresholds: 15 (15 rounds; 63 spent 2.8x the GPU time, session 15)
    if _dispatch.select("outer_threshold", device)[0] == "torch":
        cap = min(MAX_SECTIONS, min(e.numel() for e in excludes) // max(2 * m, 1))
    else:
        cap = KERNEL_SECTIONS
    sections = max(1, min(cap, max(min(counts), 1)))
    rounds = math.ceil(_BITS / math.log2(sections + 1))
    lo = torch.ops.spiel.outer_threshold(R, col_sorted, keys, row_start, need, hi, sections, rounds)
    tau = lo * (1 - 1e-12)  # relax against rounding of the quotient; candidates are re-scored exactly
    p, ex = above(tau[:, None])
    free_row = (p - ex).squeeze(1)                                 # [L, m] non-excluded candidates per row
    free = free_row.sum(1)
    ok = ok & (tau > 0) & (free >= need)
    free_row = free_row * ok[:, None]
    free = free * ok
    host_free, host_ok = torch.stack([free, ok.to(i64)]).tolist()  # the one host sync
    out: List = [None] * L
    total = sum(host_free)
    take_counts = [k if good else 0 for k, good in zip(counts, host_ok)]
    n_take = sum(take_counts)
    if n_take == 0:
        return out

    # the non-excluded candidates in (layer, row, rank) order
    flat_free = free_row.view(-1)
    g = torch.repeat_interleave(torch.arange(L * m, device=device), flat_free, output_size=total)
    j = torch.arange(total, device=device) - (torch.cumsum(flat_free, 0) - flat_free).index_select(0, g)
    layer, r = torch.div(g, m, rounding_mode="floor"), g % m
    # e_s - s (s: index inside its row) is non-decreasing per layer; offset layers to search all at once
    slot = torch.arange(width, device=device)
    keys = keys.to(i64)
    key_row = torch.div(keys, n, rounding_mode="floor").clamp_(max=m)
    adj = torch.where(keys >= mn, mn, keys - (slot - row_start.gather(1, key_row)))
    stride = mn + 1
    adj = (adj + torch.arange(L, device=device)[:, None] * stride).view(-1)
    before = torch.searchsorted(adj, layer * stride + r * n + j, side="right")
    rank = j + before - (layer * width + row_start[:, :m].reshape(-1).index_select(0, g))
    c = col_order.view(-1).index_select(0, layer * n + rank)
    pos = r * n + c
    if ordered or any(f > k for f, k, good in zip(host_free, counts, host_ok) if good):
        score = R.view(-1).index_select(0, g) * C.view(-1).index_select(0, layer * n + c)
        order = torch.sort(score, descending=True, stable=True).indices
        layer_id = layer.index_select(0, order).to(torch.int16 if L < 2**15 else torch.int32)
        pos = pos.index_select(0, order.index_select(0, torch.sort(layer_id, stable=True).indices))
    # each layer's first k: segment start (in the candidate list) minus start in the output
    shift = [s - t for s, t in zip(_prefix(host_free), _prefix(take_counts))]
    take = torch.arange(n_take, device=device) + torch.repeat_interleave(
        device_tensor(shift, device), device_tensor(take_counts, device), output_size=n_take)
    chosen = pos.index_select(0, take)
    for i, part in enumerate(chosen.split(take_counts)):
        if host_ok[i]:
            out[i] = part
    return out


def _prefix(values: Sequence[int]) -> List[int]:
    """Exclusive prefix sums of host ints."""
    out, acc = [], 0
    for v in values:
        out.append(acc)
        acc += v
    return out
