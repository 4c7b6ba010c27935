"""Entries of many dense tensors at once: ``spiel::index_put_many_`` and ``spiel::index_select_many``.

A model trained merged (``SparseDeltaLinear.merge_(train=True)``) keeps ``W + delta`` in each weight; an index
update restores the original entries at the old indices, saves the originals at the new ones and writes the new
merged entries: three ``index_put_``/``index_select`` per layer, 672 launches for a 7B model (~24 ms of GPU and
~30 us of host each, host-bound). These ops do one list in one launch per 64 tensors on CUDA; the reference
backend loops over the list.

- ``index_put_many_(dense, indices, values)``: ``dense[i].view(-1)[indices[i]] = values[i]`` for every i.
- ``index_select_many(dense, indices, out=None)``: ``out[i] = dense[i].view(-1)[indices[i]]``.

``dense`` tensors are contiguous (any shape: flat positions) and share one dtype with ``values`` / ``out``;
``indices`` are 1-D int32 or int64 (one dtype). With duplicate indices in ``index_put_many_`` the value written
is unspecified (as for ``index_put_`` without ``accumulate``). No host sync (the range check runs only with
validation on, ``spiel.ops.set_validation``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import _dispatch
from ._validate import INDEX_DTYPES

__all__ = ["index_put_many_", "index_select_many"]

torch.library.define("spiel::index_put_many_", "(Tensor(a!)[] dense, Tensor[] indices, Tensor[] values) -> ()")
torch.library.define("spiel::index_select_many", "(Tensor[] dense, Tensor[] indices, Tensor(a!)[] out) -> ()")


@torch.library.impl("spiel::index_put_many_", ["cpu", "cuda"])
def _index_put_many_impl(dense, indices, values):
    if dense:
        _dispatch.call("index_put_many", dense[0].device, list(dense), list(indices), list(values))


@torch.library.impl("spiel::index_select_many", ["cpu", "cuda"])
def _index_select_many_impl(dense, indices, out):
    if dense:
        _dispatch.call("index_select_many", dense[0].device, list(dense), list(indices), list(out))


@torch.library.register_fake("spiel::index_put_many_")
def _index_put_many_fake(dense, indices, values):
    torch._check(len(dense) == len(indices) == len(values), lambda: "dense, indices and values: one length")


@torch.library.register_fake("spiel::index_select_many")
def _index_select_many_fake(dense, indices, out):
    torch._check(len(dense) == len(indices) == len(out), lambda: "dense, indices and out: one length")


def check_entries_args(dense: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                       entries: Sequence[torch.Tensor], entries_name: str) -> None:
    """TypeError/ValueError naming the list, the position and what was expected; the index range (a host sync)
    only with validation on."""
    lists = {"dense": dense, "indices": indices, entries_name: entries}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        for i, t in enumerate(value):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    n = len(dense)
    if len(indices) != n or len(entries) != n:
        raise ValueError(f"dense, indices and {entries_name} must have the same length, got {n}, {len(indices)} and "
                         f"{len(entries)}")
    if n == 0:
        return
    dtype, index_dtype, device = dense[0].dtype, indices[0].dtype, dense[0].device
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"indices[0] must be int32 or int64, got {index_dtype}")
    validate = _dispatch.validation_enabled()
    for i in range(n):
        d, idx, e = dense[i], indices[i], entries[i]
        if d.dtype != dtype or e.dtype != dtype:
            raise TypeError(f"dense[{i}] and {entries_name}[{i}] must have dense[0]'s dtype {dtype}, got {d.dtype} and "
                            f"{e.dtype}")
        if idx.dtype != index_dtype:
            raise TypeError(f"indices[{i}] must have indices[0]'s dtype {index_dtype}, got {idx.dtype}")
        if idx.dim() != 1 or e.dim() != 1 or idx.numel() != e.numel():
            raise ValueError(f"indices[{i}] and {entries_name}[{i}] must be 1-D of one length, got shapes "
                             f"{tuple(idx.shape)} and {tuple(e.shape)}")
        if d.device != device or idx.device != device or e.device != device:
            raise ValueError(f"every tensor must be on {device}: dense[{i}] on {d.device}, indices[{i}] on "
                             f"{idx.device}, {entries_name}[{i}] on {e.device}")
        if not d.is_contiguous() or not e.is_contiguous():
            raise ValueError(f"dense[{i}] and {entries_name}[{i}] must be contiguous")
        if validate and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d.numel()):
            raise ValueError(f"indices[{i}] must lie in [0, {d.numel()}) (dense[{i}] has that many elements)")


def index_put_many_(dense: List[torch.Tensor], indices: List[torch.Tensor], values: List[torch.Tensor]) -> None:
    """``dense[i].view(-1)[indices[i]] = values[i]`` for every i, in place.

    Args:
        dense: contiguous tensors of one dtype (2, 4 or 8 bytes per element on CUDA), written in place.
        indices: 1-D int32 or int64 (one dtype) flat positions into ``dense[i]``.
        values: 1-D, ``dense``'s dtype, as many as ``indices[i]``.
    All on one device; nothing saved or returned; no host sync unless validation is on.
    """
    check_entries_args(dense, indices, values, "values")
    if dense:
        torch.ops.spiel.index_put_many_(list(dense), [i.contiguous() for i in indices], list(values))


def index_select_many(dense: List[torch.Tensor], indices: List[torch.Tensor],
                      out: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """``out[i] = dense[i].view(-1)[indices[i]]`` for every i; returns ``out`` (allocated when None).

    Args:
        dense: contiguous tensors of one dtype (read only).
        indices: 1-D int32 or int64 (one dtype) flat positions into ``dense[i]``.
        out: optional 1-D tensors of ``dense``'s dtype, as many elements as ``indices[i]`` (written in place).
    """
    if out is None:
        if isinstance(dense, (list, tuple)) and isinstance(indices, (list, tuple)) and len(dense) == len(indices) \
                and all(isinstance(t, torch.Tensor) for t in (*dense, *indices)):
            out = [torch.empty(idx.numel(), dtype=d.dtype, device=d.device) for d, idx in zip(dense, indices)]
        else:
            out = []  # check_entries_args below names what is wrong with dense / indices
    check_entries_args(dense, indices, out, "out")
    if dense:
        torch.ops.spiel.index_select_many(list(dense), [i.contiguous() for i in indices], list(out))
    return list(out)
