"""Reference top-k helpers (PyTorch ops; run on the tensors' device)."""
import torch

from ..._dispatch import register_kernel

# Streaming fallback of topk_outer: scores of at most this many entries exist at once.
_BLOCK_ELEMENTS = 1 << 22
_CHUNK = 16              # the chunked schedule of block_top ranks groups of this many entries by their maximum
_DIRECT_MAX = 1 << 25    # blocks up to this many entries take one plain torch.topk (see block_top)


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


def block_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions (int64 [k]) of the k largest of ``scores`` (fp32 without NaN), ties by the smaller
    position, whatever order ``torch.topk`` breaks ties in: the entries above the k-th value are all in topk's
    answer; of those equal to it, the first ``k - above`` by position are taken (one compare pass).

    Two schedules, picked by size from H100 measurements (``benchmarks/bench_select.py``, NOTES "AG probe"): up
    to 2**25 entries one ``torch.topk`` and two mask scans (0.57 ms at 2**24 entries, k = 193k, against 1.01 ms
    for the chunked schedule); above, a chunked two-stage top-k (topk over the chunk maxima, then over the
    entries of the k best chunks) and one sort of the 2k chosen positions (1.52 ms for a 45M-entry layer
    against 2.02 ms with one topk)."""
    n = scores.numel()
    device = scores.device
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if k >= n:
        return torch.arange(n, device=device)
    chunked = n > _DIRECT_MAX and n % _CHUNK == 0 and 4 * _CHUNK * k <= n
    if chunked:
        # chunk j = entries {j + i * n / CHUNK}: the k chunks of largest maximum hold every entry above the k-th
        # largest chunk maximum t and at least k entries >= t, so their k largest have the block's k-th value
        stride = n // _CHUNK
        chunks = torch.topk(scores.view(_CHUNK, stride).amax(0), k, sorted=False).indices
        cand_pos = (chunks[:, None] + torch.arange(0, n, stride, device=device)).view(-1)
        top_values, at = torch.topk(scores.index_select(0, cand_pos), k, sorted=False)
        top_pos = cand_pos.index_select(0, at)
    else:
        top_values, top_pos = torch.topk(scores, k, sorted=False)
    kth = top_values.min()
    above = top_values > kth                                                    # all entries above kth: a < k
    ties = torch.nonzero_static(scores == kth, size=k, fill_value=-1).view(-1)  # first min(#ties, k) tied
    take_ties = torch.arange(k, device=device) < (k - above.sum())              # the first k - a (all exist)
    if chunked:
        chosen = torch.cat([torch.where(above, top_pos, n), torch.where(take_ties, ties, n)])  # k valid, n unused
        return torch.sort(chosen).values[:k]
    # mark the k chosen positions (slot n absorbs the unused ones) and read them back in ascending order
    mask = torch.zeros(n + 1, dtype=torch.bool, device=device)
    mask.index_fill_(0, torch.where(above, top_pos, n), True)
    mask.index_fill_(0, torch.where(take_ties, ties, n), True)
    return torch.nonzero_static(mask[:n], size=k).view(-1)


@register_kernel("select_topk_abs", "torch")
def select_topk_abs(x: torch.Tensor, k: int, exclude, exclude_offset: int):
    # magnitudes in fp32 with NaN as 0 (inf stays inf); excluded positions -inf, below every magnitude. One
    # buffer with a scratch slot past the end, where out-of-range exclude entries land (no host sync to count
    # them, no second copy)
    n = x.numel()
    excluding = exclude is not None and exclude.numel() > 0
    buf = torch.empty(n + int(excluding), dtype=torch.float32, device=x.device)
    scores = buf[:n]
    scores.copy_(x)
    scores.abs_()
    torch.nan_to_num_(scores, nan=0.0, posinf=float("inf"))
    if excluding:
        local = exclude.to(torch.int64) - exclude_offset
        buf.index_fill_(0, torch.where((local >= 0) & (local < n), local, n), float("-inf"))
    positions = block_top(scores, k)
    return positions, scores.index_select(0, positions)
