"""Argument checks shared by the public op wrappers. Errors name the argument and what was expected."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ._dispatch import validation_enabled

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_LIMIT = 2**31 - 1


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x, *, dtypes=None, ndim: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_indices(indices: torch.Tensor, values: Optional[torch.Tensor], numel: int, *,
                  reference: bool = False, name: str = "indices", sorted_required: bool = True,
                  validate: Optional[bool] = None) -> None:
    """Shape/dtype checks always; value checks (sorted, unique, range) when validation is on."""
    check_tensor(name, indices, dtypes=INDEX_DTYPES, ndim=1)
    if values is not None:
        allowed = VALUE_DTYPES + ((torch.float64,) if reference else ())
        check_tensor("values", values, dtypes=allowed, ndim=1)
        if values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"indices and values must have the same length, got {indices.shape[0]} and {values.shape[0]}"
            )
    if numel > INT32_LIMIT and indices.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 for a weight of {numel} elements (more than 2**31 - 1)")
    enabled = validation_enabled() if validate is None else (bool(validate) and not torch.compiler.is_compiling())
    if indices.numel() == 0 or not enabled:
        return
    lo = int(indices.min())
    hi = int(indices.max())
    if lo < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {lo}")
    if hi >= numel:
        raise ValueError(f"{name} must be < {numel} (the weight's number of elements), got maximum {hi}")
    if indices.numel() > 1:
        steps = indices[1:] - indices[:-1]
        if sorted_required:
            if bool((steps < 0).any()):
                raise ValueError(f"{name} must be sorted in ascending order")
            if bool((steps == 0).any()):
                raise ValueError(f"{name} must be unique, found duplicates")
        elif torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"{name} must be unique, found duplicates")


def contiguous(name: str, x: torch.Tensor) -> torch.Tensor:
    """Kernels need contiguous tensors: make them so (a copy only when needed)."""
    return x if x.is_contiguous() else x.contiguous()
