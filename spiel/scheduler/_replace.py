"""The drop + regrow of an index update, for a batch of layers at once (no host sync of its own).

Layers are batched when they share a device, k and the number n of indices replaced; for each batch the drop (keep
the ``k - n`` largest ``|value|``, ties: the larger position leaves) and the merge of kept and regrown positions
are one op per (values, indices) dtype pair (:func:`spiel.ops.drop_regrow_indices`: nine CUDA launches), the
gathering of the new values a few launches on ``[L, k]`` tensors, and so are the writes of the new indices and
values into the layers (:func:`spiel.nn.linear.set_indices_many`, the trusted ``set_indices``) and the permutation
of the optimizer's per-slot state (its ``reindex_many``, else ``reindex`` per layer).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Hashable, List, Sequence, TypeVar

import torch

from .._batching import group_batches
from ..nn.linear import SparseDeltaLinear, rebuild_sddmm_plans, set_indices_many
from ._select import device_tensor

__all__ = ["batches", "drop_and_regrow", "set_indices_trusted", "set_indices_trusted_many", "set_candidates_trusted",
           "rebuild_plans", "reindex_many"]

#: Most elements (L * k) one batch of the update works on: bounds its temporaries (~30 bytes per element: the new
#: indices, the int64 slot order, the gathered values and the optimizer-state gathers). H100, 7B AG: at 2**26 the
#: update step peaked 4.4 GiB above the plain steps, at 2**24 0.73 GiB (session 3, the sort-based drop); since the
#: drop + merge is one op (spiel.ops.drop_regrow_indices) 2**23 leaves 0.24 GiB of temporaries and 20 batches at
#: 7B, and 2**24 (0.48 GiB, 10 batches) did not shorten the update (session 14 call 5: 66-69 against 62-65 ms).
BATCH_ELEMENTS = 1 << 23

T = TypeVar("T")


def batches(items: Sequence[T], key: Callable[[T], Hashable], size: Callable[[T], int],
            budget: int = BATCH_ELEMENTS) -> List[List[T]]:
    """:func:`spiel._batching.group_batches` with the update's budget (:data:`BATCH_ELEMENTS`) by default."""
    return group_batches(items, key, size, budget)


def set_indices_trusted(layer, indices: torch.Tensor, values: torch.Tensor) -> None:
    """``layer.set_indices`` without the value checks (indices sorted, unique, in range, no candidates set).
    A :class:`SparseDeltaLinear`'s sddmm plan is left stale: call :func:`rebuild_plans` on the batch after."""
    if isinstance(layer, SparseDeltaLinear):
        layer.set_indices(indices, values, validate=False, rebuild_plan=False)
    else:  # a layer-contract look-alike: its own set_indices
        layer.set_indices(indices, values)


def set_indices_trusted_many(layers: Sequence, indices: torch.Tensor, values: torch.Tensor) -> None:
    """:func:`set_indices_trusted` of every ``layers[i]`` with row i of ``indices`` / ``values`` [L, k]: batched
    (:func:`spiel.nn.linear.set_indices_many`) when every layer is a :class:`SparseDeltaLinear`. Plans left stale."""
    if all(isinstance(layer, SparseDeltaLinear) for layer in layers):
        set_indices_many(layers, indices, values, rebuild_plan=False)
        return
    for layer, idx, vals in zip(layers, indices.unbind(0), values.unbind(0)):
        set_indices_trusted(layer, idx, vals)


def reindex_many(optimizer, layers: Sequence, order: torch.Tensor, regrown: torch.Tensor, reindex_fallback) -> None:
    """The optimizer's per-slot state of ``layers`` permuted after an index update (row i of ``order`` /
    ``regrown`` [L, k] for ``layers[i]``): its ``reindex_many`` when it has one, else its ``reindex`` per layer,
    else ``reindex_fallback(optimizer, values, order, regrown)`` per layer."""
    batched = getattr(optimizer, "reindex_many", None)
    if callable(batched):
        batched(layers, order, regrown)
        return
    reindex = getattr(optimizer, "reindex", None)
    for layer, o, r in zip(layers, order.unbind(0), regrown.unbind(0)):
        if callable(reindex):
            reindex(layer, o, r)
        else:
            reindex_fallback(optimizer, layer.values, o, r)


def set_candidates_trusted(layer, candidates: torch.Tensor) -> None:
    """``layer.set_candidates`` without the value checks (sorted, unique, in range, disjoint from indices).
    A :class:`SparseDeltaLinear`'s sddmm plan is left stale: call :func:`rebuild_plans` on the batch after."""
    if isinstance(layer, SparseDeltaLinear):
        layer.set_candidates(candidates, validate=False, rebuild_plan=False)
    else:
        layer.set_candidates(candidates)


def rebuild_plans(layers: Sequence) -> None:
    """The sddmm plans of the :class:`SparseDeltaLinear` among ``layers``, decided with one host read. Not
    bank-balanced: on an H100 the balancing cost ~0.25 s per 7B update at 0.1% density (11.7% update overhead
    at S = 20, session 9) for a 2-5% faster sparse kernel, which pays back only after ~100 steps."""
    ours = [layer for layer in layers if isinstance(layer, SparseDeltaLinear)]
    if ours:
        rebuild_sddmm_plans(ours, balance=False)


@torch.no_grad()
def drop_and_regrow(layers: Sequence, regrown: torch.Tensor, optimizer, reindex_fallback, *,
                    rebuild_plan: bool = True) -> None:
    """Replace, in every layer of the batch, its ``n`` smallest-``|value|`` entries (ties: the larger position
    leaves) by the positions ``regrown[i]`` (value 0, fresh optimizer state); indices stay sorted, k constant.

    Args:
        layers: layers of one device with the same k (one values dtype and one index dtype take one launch group;
            mixed ones are split).
        regrown: int64 [L, n] ascending per row, disjoint from each layer's indices (0 < n <= k).
        optimizer: its ``reindex_many(layers, order, regrown)`` is called when it has one, else its
            ``reindex(layer, order, regrown)`` per layer, else ``reindex_fallback(optimizer, values, order, regrown)``.
        rebuild_plan: rebuild the layers' sddmm plans at the end (one host read). False leaves them stale for a
            caller that updates several batches and rebuilds every plan with one read (:func:`rebuild_plans`).
    """
    L, n = regrown.shape
    device = regrown.device
    k = layers[0].values.numel()
    if any(layer.values.numel() != k for layer in layers) or not 0 < n <= k:
        raise ValueError("drop_and_regrow: the layers of a batch must share k, with 0 < n <= k")
    values = [layer.values for layer in layers]  # no_grad: no detach
    indices = [layer.indices for layer in layers]
    # the op without its checks (the trusted path): new indices [L, k] and each new slot's old slot (-1: regrown);
    # it takes one values dtype and one index dtype (a model's layers usually share them): mixed rows are split
    kinds: Dict[tuple, List[int]] = defaultdict(list)
    for row, (v, idx) in enumerate(zip(values, indices)):
        kinds[(v.dtype, idx.dtype)].append(row)
    if len(kinds) == 1:
        new_indices, order = torch.ops.spiel.drop_regrow_indices(values, indices, regrown)
    else:
        new_indices = torch.empty(L, k, dtype=torch.int64, device=device)
        order = torch.empty(L, k, dtype=torch.int64, device=device)
        for rows in kinds.values():
            sel = device_tensor(rows, device)  # pinned + non_blocking: no host sync
            part_indices, part_order = torch.ops.spiel.drop_regrow_indices(
                [values[r] for r in rows], [indices[r] for r in rows], regrown.index_select(0, sel))
            new_indices.index_copy_(0, sel, part_indices.to(torch.int64))
            order.index_copy_(0, sel, part_order)
    is_regrown = order < 0
    new_values = torch.stack(values).gather(1, order.clamp(min=0)).masked_fill_(is_regrown, 0)
    set_indices_trusted_many(layers, new_indices, new_values)
    del new_indices, new_values  # the reindex has [L, k] temporaries of its own (peak memory)
    reindex_many(optimizer, layers, order, is_regrown, reindex_fallback)
    if rebuild_plan:
        rebuild_plans(layers)
