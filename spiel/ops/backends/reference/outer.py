"""Reference (pure PyTorch) threshold multisection of ``spiel.ops.outer_threshold``: every round vectorised over
the layers, the thresholds and the rows (two ``searchsorted`` per round), ~15 launches per round."""
import torch

from ..._dispatch import register_kernel


def thresholds(lo: torch.Tensor, hi: torch.Tensor, sections: int) -> torch.Tensor:
    """[L, sections]: ``lo + (hi - lo) * (s / (sections + 1))``, each operation rounded once (as the kernels do).
    The fraction is divided by a device tensor: CUDA divides by a host scalar as a multiply by its reciprocal."""
    frac = torch.arange(1, sections + 1, device=lo.device, dtype=torch.float64).div(
        torch.full((), sections + 1, device=lo.device, dtype=torch.float64))
    return lo[:, None] + (hi - lo)[:, None] * frac


@register_kernel("outer_threshold", "torch")
@torch.no_grad()
def outer_threshold(rows, cols, keys, row_start, need, hi, sections: int, rounds: int):
    L, m = rows.shape
    n = cols.shape[1]
    f64 = torch.float64
    cols_ascending = cols.flip(1).contiguous()
    row_base = torch.arange(m, device=rows.device) * n
    positive = rows > 0
    inf = torch.full((), float("inf"), dtype=f64, device=rows.device)  # a fill, not a host-to-device copy
    lo = torch.zeros(L, dtype=f64, device=rows.device)  # hi is rebound each round, never written
    for _ in range(rounds):
        mids = thresholds(lo, hi, sections)                                     # [L, S], non-decreasing
        ratio = torch.where(positive[:, None, :], mids[:, :, None] / rows[:, None, :], inf)  # [L, S, m]
        p = n - torch.searchsorted(cols_ascending, ratio.view(L, -1), side="left").view(L, sections, m)
        query = (row_base + p).view(L, -1).to(keys.dtype)
        excluded = torch.searchsorted(keys, query).view(L, sections, m) - row_start[:, None, :m]
        enough = (p.sum(2) - excluded.sum(2)) >= need[:, None]                 # a True prefix
        j = enough.sum(1, keepdim=True)
        bounds = torch.cat([lo[:, None], mids, hi[:, None]], 1)
        lo, hi = bounds.gather(1, j).squeeze(1), bounds.gather(1, j + 1).squeeze(1)
    return lo
