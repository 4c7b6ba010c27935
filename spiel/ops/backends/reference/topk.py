"""Reference top-k helpers (PyTorch ops; run on the tensors' device)."""
import torch

from ..._dispatch import register_kernel

# Streaming fallback of topk_outer: scores of at most this many entries exist at once.
_BLOCK_ELEMENTS = 1 << 22


def ranked(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The k positions of largest score, ties by smaller position (positions must be ascending)."""
    if k == 0:
        return positions[:0]
    if scores.numel() > 4 * k:
        # keep everything tied with the k-th score, then order exactly: deterministic at the boundary
        kth = torch.topk(scores, k, sorted=False).values.min()
        keep = scores >= kth
        scores, positions = scores[keep], positions[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return positions[order]


@register_kernel("topk_abs", "torch")
def topk_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    positions = torch.arange(x.numel(), device=x.device)
    return ranked(x.abs().float(), positions, k)


def _excluded_in(exclude, lo: int, hi: int):
    if exclude is None or exclude.numel() == 0:
        return None
    a = torch.searchsorted(exclude, torch.tensor([lo, hi], device=exclude.device, dtype=exclude.dtype))
    return exclude[int(a[0]):int(a[1])].long() - lo


def _streaming(row, col, k, exclude):
    """Running top-k over row blocks (handles ties at zero exactly)."""
    n = col.numel()
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    best_scores = row.new_empty(0, dtype=torch.float64)
    best_pos = torch.empty(0, dtype=torch.int64, device=row.device)
    for r0 in range(0, row.numel(), rows_per_block):
        r1 = min(row.numel(), r0 + rows_per_block)
        scores = (row[r0:r1, None].double() * col[None, :].double()).reshape(-1)
        positions = torch.arange(r0 * n, r1 * n, device=row.device)
        ex = _excluded_in(exclude, r0 * n, r1 * n)
        if ex is not None and ex.numel():
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep[ex] = False
            scores, positions = scores[keep], positions[keep]
        scores = torch.cat([best_scores, scores])
        positions = torch.cat([best_pos, positions])
        top = ranked(scores, positions, min(k, scores.numel()))
        # recover the kept scores in rank order
        best_scores = scores[torch.searchsorted(positions, top)]
        best_pos = top
        best_pos, perm = torch.sort(best_pos)  # keep positions ascending for the next merge
        best_scores = best_scores[perm]
    return ranked(best_scores, best_pos, k)


@register_kernel("topk_outer", "torch")
def topk_outer(row: torch.Tensor, col: torch.Tensor, k: int, exclude) -> torch.Tensor:
    m, n = row.numel(), col.numel()
    n_excl = 0 if exclude is None else exclude.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=row.device)
    need = k + n_excl
    row64, col64 = row.double(), col.double()
    col_sorted, col_order = torch.sort(col64, descending=True, stable=True)
    col_ascending = col_sorted.flip(0)

    def count_at_least(tau):
        # number of (r, c) with row[r] * col[c] >= tau, counted through the sorted column scores
        with torch.no_grad():
            ratio = torch.where(row64 > 0, tau / row64, torch.full_like(row64, float("inf")))
            return (n - torch.searchsorted(col_ascending, ratio, side="left")).sum()

    hi = row64.max() * col64.max()
    if need >= m * n // 2 or float(hi) == 0.0:
        return _streaming(row, col, k, exclude)
    # bisection for the largest tau with count(tau) >= need, on the device (60 halvings of a float64 range)
    lo = torch.zeros((), dtype=torch.float64, device=row.device)
    for _ in range(60):
        mid = (lo + hi) / 2
        enough = count_at_least(mid) >= need
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid)
    tau = lo * (1 - 1e-12)  # relax against rounding of the quotient; candidates are re-scored exactly
    if float(tau) <= 0.0:
        return _streaming(row, col, k, exclude)
    ratio = torch.where(row64 > 0, tau / row64, torch.full_like(row64, float("inf")))
    per_row = n - torch.searchsorted(col_ascending, ratio, side="left")
    r = torch.repeat_interleave(torch.arange(m, device=row.device), per_row)
    starts = torch.cumsum(per_row, 0) - per_row
    rank = torch.arange(r.numel(), device=row.device) - starts[r]
    c = col_order[rank]
    positions = r * n + c
    if n_excl:
        hit = torch.searchsorted(exclude.long(), positions)
        hit = hit.clamp(max=n_excl - 1)
        positions = positions[exclude.long()[hit] != positions]
    positions = torch.sort(positions).values
    scores = row64[positions // n] * col64[positions % n]
    return ranked(scores, positions, k)
