"""The drop + regrow of an index update for a batch of rows: ``spiel::drop_regrow_indices``.

For row i (a layer's ``values[i]`` / ``indices[i]``, k entries, indices ascending and unique) the ``k - n``
entries of largest ``|values[i]|`` stay (compared in fp32, NaN largest; ties: the smaller slot stays, i.e. the
larger position leaves), the n others leave, and the n positions ``regrown[i]`` (ascending, unique, none of them
in ``indices[i]``) come in. Returned:

- ``new_indices`` [L, k], ``indices``' dtype: the kept and regrown positions, ascending per row;
- ``order`` [L, k] int64: for each new slot, the old slot its entry comes from, -1 for a regrown position (so
  ``values[i][order[i]]`` moves the kept values, and an optimizer's per-slot state, to their new slots).

The reference sorts every row; the CUDA kernel is a radix select per row and one merge pass (nine launches per
64 rows, ``csrc/replace.cu``). No host sync (the value checks run only with validation on).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from . import _dispatch
from ._validate import INDEX_DTYPES

__all__ = ["drop_regrow_indices"]

torch.library.define("spiel::drop_regrow_indices", "(Tensor[] values, Tensor[] indices, Tensor regrown) -> (Tensor, Tensor)")

_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@torch.library.impl("spiel::drop_regrow_indices", ["cpu", "cuda"])
def _drop_regrow_indices_impl(values, indices, regrown):
    return _dispatch.call("drop_regrow_indices", regrown.device, list(values), list(indices), regrown)


@torch.library.register_fake("spiel::drop_regrow_indices")
def _drop_regrow_indices_fake(values, indices, regrown):
    torch._check(len(values) == len(indices) == regrown.shape[0], lambda: "values, indices, regrown: one length")
    L, k = len(values), values[0].numel()
    return (regrown.new_empty((L, k), dtype=indices[0].dtype), regrown.new_empty((L, k), dtype=torch.int64))


def _check(values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], regrown: torch.Tensor) -> None:
    for name, items in (("values", values), ("indices", indices)):
        if not isinstance(items, (list, tuple)) or not items:
            raise TypeError(f"{name} must be a non-empty list of tensors, got {type(items).__name__}")
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(regrown, torch.Tensor):
        raise TypeError(f"regrown must be a torch.Tensor, got {type(regrown).__name__}")
    L = len(values)
    if len(indices) != L:
        raise ValueError(f"values and indices must have the same length, got {L} and {len(indices)}")
    if regrown.dtype != torch.int64 or regrown.dim() != 2 or regrown.shape[0] != L:
        raise ValueError(f"regrown must be int64 [len(values)={L}, n], got {regrown.dtype} of shape "
                         f"{tuple(regrown.shape)}")
    k, n = values[0].numel(), regrown.shape[1]
    if n > k:
        raise ValueError(f"regrown must have at most k = {k} positions per row, got {n}")
    device, value_dtype, index_dtype = regrown.device, values[0].dtype, indices[0].dtype
    if value_dtype not in _VALUE_DTYPES:
        raise TypeError(f"values[0] must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {value_dtype}")
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"indices[0] must be int32 or int64, got {index_dtype}")
    for i, (v, idx) in enumerate(zip(values, indices)):
        if v.dtype != value_dtype or idx.dtype != index_dtype:
            raise TypeError(f"values[{i}] / indices[{i}] must have dtypes {value_dtype} / {index_dtype} (those of "
                            f"row 0), got {v.dtype} / {idx.dtype}")
        if v.dim() != 1 or idx.dim() != 1 or v.numel() != k or idx.numel() != k:
            raise ValueError(f"values[{i}] and indices[{i}] must be 1-D of k = {k} entries, got shapes "
                             f"{tuple(v.shape)} and {tuple(idx.shape)}")
        if v.device != device or idx.device != device:
            raise ValueError(f"values[{i}] and indices[{i}] must be on regrown's device {device}, got {v.device} and "
                             f"{idx.device}")
    if not _dispatch.validation_enabled() or torch.compiler.is_compiling():
        return
    old = torch.stack(list(indices)).to(torch.int64)
    for name, t in (("indices", old), ("regrown", regrown)):
        if t.shape[1] > 1 and bool((t[:, 1:] <= t[:, :-1]).any()):
            raise ValueError(f"{name} must be ascending and unique in every row")
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name} must be non-negative")
    if n and k and bool(_hits(old, regrown).any()):
        raise ValueError("regrown must not contain a position already in indices (same row)")


def _hits(old: torch.Tensor, regrown: torch.Tensor) -> torch.Tensor:
    """[L, n] bool: regrown[i, j] is in old[i] (both ascending per row)."""
    at = torch.searchsorted(old, regrown).clamp(max=old.shape[1] - 1)
    return old.gather(1, at) == regrown


def drop_regrow_indices(values: List[torch.Tensor], indices: List[torch.Tensor],
                        regrown: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop the n smallest-``|value|`` entries of every row and insert the regrown positions.

    Args:
        values: L 1-D float tensors of k entries (fp32, bf16, fp16; fp64 compared in fp32), e.g. layers' values.
        indices: L 1-D int32/int64 (one dtype) of k positions, ascending and unique per row.
        regrown: int64 [L, n], 0 <= n <= k, ascending and unique per row, disjoint from that row's indices.
    Returns:
        (new_indices [L, k] in ``indices``' dtype, ascending per row; order [L, k] int64: the old slot of each new
        slot's entry, -1 where a regrown position sits). All on ``regrown``'s device; nothing saved, no host sync
        unless validation is on.
    """
    _check(values, indices, regrown)
    return torch.ops.spiel.drop_regrow_indices([v.detach().contiguous() for v in values],
                                               [i.contiguous() for i in indices], regrown.contiguous())
