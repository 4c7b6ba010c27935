"""The threshold search of SpIEL-MA's batched regrowth: ``spiel::outer_threshold``.

For L layers of one shape m x n, the score of cell ``(r, c)`` of layer ``l`` is ``rows[l, r] * cols[l, c]`` and
some cells are excluded (the active indices). With ``cols[l]`` sorted in descending order (cell ``(r, q)``: the
column of rank ``q``), the cells above a threshold ``tau`` in row ``r`` are the ranks ``[0, p_r(tau))``,
``p_r(tau) = #{q : cols[l, q] >= tau / rows[l, r]}`` (float64 division; 0 when ``rows[l, r] <= 0``), and the
excluded ones are given as sorted keys ``r * n + q``. So the non-excluded cells above ``tau`` number

    count_l(tau) = sum_r p_r(tau) - #{keys of row r below r * n + p_r(tau)}.

Starting from ``[lo, hi] = [0, hi[l]]``, each of ``rounds`` rounds cuts the interval at ``sections`` thresholds
``lo + (hi - lo) * (s / (sections + 1))``, s = 1..sections, and keeps the piece between the last threshold with
``count_l >= need[l]`` and the next one (the counts fall as ``tau`` rises). The op returns ``lo`` [L] float64:
after 60 bits of resolution, every cell of the top ``need[l]`` scores is at or above ``lo`` (up to the rounding
of the quotient, which the caller relaxes). ``spiel.scheduler`` then enumerates those cells exactly.

Backends compute bit-identical results (integer counts; the thresholds with the same float64 operations in the
same order, no fused multiply-add). The reference runs ~15 torch launches per round; the Triton and CUDA kernels
one launch per round (and one at the end), none of them syncs with the host.
"""
from __future__ import annotations

import torch

from . import _dispatch
from ._validate import check_same_device, check_tensor

__all__ = ["outer_threshold", "MAX_SECTIONS"]

MAX_SECTIONS = 63  # thresholds per round: the kernels keep 64 counters per layer

torch.library.define("spiel::outer_threshold",
                     "(Tensor rows, Tensor cols, Tensor keys, Tensor row_start, Tensor need, Tensor hi, int sections, "
                     "int rounds) -> Tensor")


@torch.library.impl("spiel::outer_threshold", ["cpu", "cuda"])
def _outer_threshold_impl(rows, cols, keys, row_start, need, hi, sections, rounds):
    return _dispatch.call("outer_threshold", rows.device, rows, cols, keys, row_start, need, hi, sections, rounds)


@torch.library.register_fake("spiel::outer_threshold")
def _outer_threshold_fake(rows, cols, keys, row_start, need, hi, sections, rounds):
    return rows.new_empty((rows.shape[0],))


def _check_int(name: str, value, low: int, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}")


def outer_threshold(rows: torch.Tensor, cols: torch.Tensor, keys: torch.Tensor, row_start: torch.Tensor,
                    need: torch.Tensor, hi: torch.Tensor, sections: int, rounds: int) -> torch.Tensor:
    """Multisection of the score threshold of L outer products (see the module docstring).

    Args:
        rows: float64 [L, m], finite and non-negative (``hi[l] = 0`` for a layer that is not: its result is 0).
        cols: float64 [L, n], finite, non-negative, sorted in descending order per layer.
        keys: int32/int64 [L, w], ascending per layer: the excluded cells as ``r * n + q`` (q: the column's rank
            in ``cols``), unique, padded at the end with ``m * n``; int32 needs ``m * n < 2**31``.
        row_start: int64 [L, m + 1]: ``row_start[l, r]`` = number of keys below ``r * n``.
        need: int64 [L], how many cells must stay at or above the threshold; hi: float64 [L], the start's upper end.
        sections: thresholds per round, 1..63; rounds: number of rounds (>= 0).
    Returns:
        lo float64 [L] on ``rows``' device. No host sync (value checks run only with validation on).
    """
    check_tensor("rows", rows, dtypes=(torch.float64,), ndim=2)
    check_tensor("cols", cols, dtypes=(torch.float64,), ndim=2)
    check_tensor("keys", keys, dtypes=(torch.int32, torch.int64), ndim=2)
    check_tensor("row_start", row_start, dtypes=(torch.int64,), ndim=2)
    check_tensor("need", need, dtypes=(torch.int64,), ndim=1)
    check_tensor("hi", hi, dtypes=(torch.float64,), ndim=1)
    check_same_device(rows=rows, cols=cols, keys=keys, row_start=row_start, need=need, hi=hi)
    L, m = rows.shape
    n = cols.shape[1]
    for name, t, shape in (("cols", cols, (L, n)), ("keys", keys, (L, keys.shape[1])),
                           ("row_start", row_start, (L, m + 1)), ("need", need, (L,)), ("hi", hi, (L,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (L = rows.shape[0] = {L}, m = {m}, n = {n}), got "
                             f"{tuple(t.shape)}")
    if keys.dtype == torch.int32 and m * n >= 2**31:
        raise TypeError(f"keys must be int64 when m * n = {m * n} >= 2**31 (the padding key m * n must fit)")
    _check_int("sections", sections, 1, MAX_SECTIONS)
    _check_int("rounds", rounds, 0)
    if _dispatch.validation_enabled() and L and keys.shape[1]:
        if int(keys.min()) < 0 or int(keys.max()) > m * n:
            raise ValueError(f"keys must be in [0, m * n = {m * n}]")
        if keys.shape[1] > 1 and bool((keys[:, 1:] < keys[:, :-1]).any()):
            raise ValueError("keys must be ascending in every row")
        if n > 1 and bool((cols[:, 1:] > cols[:, :-1]).any()):
            raise ValueError("cols must be sorted in descending order in every row")
        if bool((need < 0).any()):
            raise ValueError("need must be non-negative")
    return torch.ops.spiel.outer_threshold(rows.contiguous(), cols.contiguous(), keys.contiguous(),
                                           row_start.contiguous(), need.contiguous(), hi.contiguous(), sections,
                                           rounds)
