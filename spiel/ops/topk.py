"""Top-k helpers for index selection: ``spiel::topk_abs``, ``spiel::topk_outer`` and ``spiel::select_topk_abs``.

All break ties by the smaller position, so every rank of a distributed job picks the same entries from the same
statistics. ``topk_abs``/``topk_outer`` return positions by rank; ``select_topk_abs`` returns the chosen set in
ascending position order with the magnitudes (the SpIEL-AG probe: the largest weight-gradient entries outside
the active indices, 16.7M-67M entries per call).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch
from ._validate import check_same_device, check_tensor

torch.library.define("spiel::topk_abs", "(Tensor x, int k) -> Tensor")
torch.library.define("spiel::topk_outer", "(Tensor row, Tensor col, int k, Tensor? exclude) -> Tensor")
torch.library.define("spiel::select_topk_abs",
                     "(Tensor x, int k, Tensor? exclude, int exclude_offset) -> (Tensor, Tensor)")


@torch.library.impl("spiel::topk_abs", ["cpu", "cuda"])
def _topk_abs_impl(x, k):
    return _dispatch.call("topk_abs", x.device, x, k)


@torch.library.impl("spiel::topk_outer", ["cpu", "cuda"])
def _topk_outer_impl(row, col, k, exclude):
    return _dispatch.call("topk_outer", row.device, row, col, k, exclude)


@torch.library.impl("spiel::select_topk_abs", ["cpu", "cuda"])
def _select_topk_abs_impl(x, k, exclude, exclude_offset):
    return _dispatch.call("select_topk_abs", x.device, x, k, exclude, exclude_offset)


@torch.library.register_fake("spiel::select_topk_abs")
def _select_topk_abs_fake(x, k, exclude, exclude_offset):
    return x.new_empty((k,), dtype=torch.int64), x.new_empty((k,), dtype=torch.float32)


@torch.library.register_fake("spiel::topk_abs")
def _topk_abs_fake(x, k):
    return x.new_empty((k,), dtype=torch.int64)


@torch.library.register_fake("spiel::topk_outer")
def _topk_outer_fake(row, col, k, exclude):
    return row.new_empty((k,), dtype=torch.int64)


_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_k(k, available: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0 or k > available:
        raise ValueError(f"k must be in [0, {available}] ({what}), got {k}")
    return k


def topk_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64 [k]) of the k largest ``|x|`` of a 1-D tensor, largest first, ties by position."""
    check_tensor("x", x, dtypes=_FLOATS, ndim=1)
    _check_k(k, x.numel(), "the number of elements of x")
    return torch.ops.spiel.topk_abs(x.contiguous(), k)


def topk_outer(row: torch.Tensor, col: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-k flat positions ``r * len(col) + c`` of ``row[r] * col[c]`` without forming the product.

    Args:
        row: [m] non-negative scores; col: [n] non-negative scores (e.g. SM3 accumulators).
        k: how many positions to return.
        exclude: optional sorted int32/int64 flat positions that may not be chosen (the active indices).
    Returns int64 [k], largest product first, ties broken by the smaller position. Memory O(m + n + k +
    len(exclude)), never m x n.
    """
    check_tensor("row", row, dtypes=_FLOATS, ndim=1)
    check_tensor("col", col, dtypes=_FLOATS, ndim=1)
    check_same_device(row=row, col=col, exclude=exclude)
    n_excl = 0
    if exclude is not None:
        check_tensor("exclude", exclude, dtypes=(torch.int32, torch.int64), ndim=1)
        n_excl = exclude.numel()
        if _dispatch.validation_enabled() and n_excl:
            if int(exclude.min()) < 0 or int(exclude.max()) >= row.numel() * col.numel():
                raise ValueError(f"exclude must hold positions in [0, {row.numel() * col.numel()})")
            if n_excl > 1 and bool(((exclude[1:] - exclude[:-1]) <= 0).any()):
                raise ValueError("exclude must be sorted and unique")
    if _dispatch.validation_enabled() and (bool((row < 0).any()) or bool((col < 0).any())):
        raise ValueError("row and col must be non-negative")
    _check_k(k, row.numel() * col.numel() - n_excl, "len(row) * len(col) minus len(exclude)")
    return torch.ops.spiel.topk_outer(row.contiguous(), col.contiguous(), k,
                                      None if exclude is None else exclude.contiguous())


def select_topk_abs(x: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None,
                    exclude_offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``|x|`` of a 1-D tensor as a set: ``(positions int64 [k] ascending, |x| fp32 [k])``.

    Magnitudes are compared in fp32 (NaN counts as 0); ties go to the smaller position. Positions listed in
    ``exclude`` rank below every other entry: ``exclude`` holds sorted unique int32/int64 positions into a larger
    array of which ``x`` is the slice starting at ``exclude_offset`` (entries outside
    ``[exclude_offset, exclude_offset + len(x))`` are ignored), so one sorted list of a layer's active indices
    serves every row block of its gradient. An excluded position is returned only when fewer than ``k`` others
    exist, with magnitude ``-inf``. ``x`` is not modified. No host sync (the CUDA kernel is a radix select:
    three streaming passes over 16-bit ``x``, five over fp32; the reference copies ``x`` once).
    """
    check_tensor("x", x, dtypes=_FLOATS, ndim=1)
    _check_k(k, x.numel(), "the number of elements of x")
    if isinstance(exclude_offset, bool) or not isinstance(exclude_offset, int):
        raise TypeError(f"exclude_offset must be an int, got {type(exclude_offset).__name__}")
    if exclude_offset < 0:
        raise ValueError(f"exclude_offset must be non-negative, got {exclude_offset}")
    if exclude is not None:
        check_tensor("exclude", exclude, dtypes=(torch.int32, torch.int64), ndim=1)
        check_same_device(x=x, exclude=exclude)
        if _dispatch.validation_enabled() and exclude.numel():
            if int(exclude.min()) < 0:
                raise ValueError("exclude must hold non-negative positions")
            if exclude.numel() > 1 and bool(((exclude[1:] - exclude[:-1]) <= 0).any()):
                raise ValueError("exclude must be sorted and unique")
    return torch.ops.spiel.select_topk_abs(x.contiguous(), k, None if exclude is None else exclude.contiguous(),
                                           exclude_offset)
