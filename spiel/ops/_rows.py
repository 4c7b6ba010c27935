"""Row-wise selection helpers shared by the reference backends (``spiel.ops.backends.reference``) and the
scheduler (``spiel.scheduler``): deterministic (ties by the smaller position) and without host syncs."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["true_positions", "device_tensor", "rank_rows", "chosen_ascending", "top_abs_rows"]


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending int64 positions of the ``True`` entries of a 1-D bool ``mask`` that holds exactly ``count`` of
    them (the caller guarantees it). No host sync: the output size is ``count``."""
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 1-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=mask.device)
    return torch.nonzero_static(mask, size=count).view(-1)


def device_tensor(values: Sequence[int], device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without a blocking copy (pinned + non_blocking on CUDA)."""
    t = torch.tensor(list(values), dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def rank_rows(magnitudes: torch.Tensor) -> torch.Tensor:
    """[L, W] -> per row, the positions by magnitude descending (NaN first), ties by the smaller position."""
    return torch.sort(magnitudes, dim=1, descending=True, stable=True).indices


def chosen_ascending(order: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Flat ascending positions ``l * W + p`` of the first ``counts[l]`` entries of each row of ``order``."""
    L, width = order.shape
    device = order.device
    if len(set(counts)) == 1:
        by_rank = torch.zeros(L, width, dtype=torch.bool, device=device)
        by_rank[:, :counts[0]] = True
    else:
        by_rank = torch.arange(width, device=device)[None, :] < device_tensor(counts, device)[:, None]
    chosen = torch.zeros(L, width, dtype=torch.bool, device=device).scatter_(1, order, by_rank)
    return true_positions(chosen.view(-1), sum(counts))


def top_abs_rows(values: torch.Tensor, count: int, *, ascending: bool = False) -> torch.Tensor:
    """Per row of ``values`` [L, W]: the positions (int64 [L, count]) of the ``count`` largest ``|value|``
    (compared in fp32, NaN largest), ties by the smaller position; by rank, or ascending. No host sync."""
    L, width = values.shape
    if not 0 <= count <= width:
        raise ValueError(f"count must be in [0, {width}], got {count}")
    magnitudes = values.float().abs() if values.dtype != torch.float32 else values.abs()
    order = rank_rows(magnitudes)
    if not ascending:
        return order[:, :count]
    flat = chosen_ascending(order, [count] * L)
    return flat.view(L, count) - (torch.arange(L, device=values.device) * width)[:, None]
