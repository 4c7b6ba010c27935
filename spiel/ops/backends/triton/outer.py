"""Triton threshold multisection (backend "triton" of ``spiel.ops.outer_threshold``).

As the CUDA kernel (csrc/outer.cu): one launch per round, grid (row blocks, layers). Each program derives its
layer's interval from the previous round's counters, counts the non-excluded cells above each threshold over
its rows ([rows, lanes] binary searches with a fixed number of steps: log2(n + 1) in the descending columns,
log2(w + 1) in the row's excluded keys; lanes: the smallest power of two above ``sections``) and adds them to
this round's counters with integer atomics.
Counters rotate over three buffers and intervals over two, so consecutive launches never race. Compiled without
floating-point contraction, so the thresholds are the reference's doubles, bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dispatch import register_kernel

COUNTERS = 64  # counters per layer (sections <= 63)
BLOCK = 1024   # (row, threshold) pairs per program: BLOCK // LANES rows
NUM_WARPS = 4


@triton.jit
def _interval(hi_ptr, interval_ptr, counts_ptr, need_ptr, layer, L, rnd, sections, s_lane):
    # `sections + 1` is divided as an int: Triton specialises an argument equal to 1 into a constant
    """(lo, hi) searched by round `rnd` of `layer` (round 0: [0, hi])."""
    if rnd == 0:
        lo = tl.zeros((), tl.float64)
        hi = tl.load(hi_ptr + layer)
    else:
        prev = interval_ptr + (((rnd - 1) % 2) * L + layer) * 2
        plo = tl.load(prev)
        phi = tl.load(prev + 1)
        cnt = tl.load(counts_ptr + (((rnd - 1) % 3) * L + layer) * 64 + s_lane, mask=s_lane < sections, other=0)
        need = tl.load(need_ptr + layer)
        j = tl.sum(((cnt >= need) & (s_lane < sections)).to(tl.int32), axis=0)
        frac = (s_lane + 1).to(tl.float64) / (sections + 1)
        mids = plo + (phi - plo) * frac
        # bounds = [plo, mids..., phi]; exactly one lane is picked, the others add +0.0
        lo = tl.where(j == 0, plo, tl.sum(tl.where(s_lane == j - 1, mids, 0.0), axis=0))
        hi = tl.where(j == sections, phi, tl.sum(tl.where(s_lane == j, mids, 0.0), axis=0))
    return lo, hi


@triton.jit
def _round_kernel(rows_ptr, cols_ptr, keys_ptr, row_start_ptr, need_ptr, hi_ptr, interval_ptr, counts_ptr, L, m, n,
                  width, sections, rnd, N_STEPS: tl.constexpr, K_STEPS: tl.constexpr, BLOCK_R: tl.constexpr,
                  LANES: tl.constexpr):
    pid_r = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    s_lane = tl.arange(0, LANES)
    lo, hi = _interval(hi_ptr, interval_ptr, counts_ptr, need_ptr, layer, L, rnd, sections, s_lane)
    frac = (s_lane + 1).to(tl.float64) / (sections + 1)
    mids = lo + (hi - lo) * frac                                           # [LANES]
    if pid_r == 0:
        cur = interval_ptr + ((rnd % 2) * L + layer) * 2
        tl.store(cur, lo)
        tl.store(cur + 1, hi)
        # the next round's counters: those of round rnd - 2, last read by round rnd - 1, which has finished
        tl.store(counts_ptr + (((rnd + 1) % 3) * L + layer) * 64 + s_lane, tl.zeros([LANES], tl.int64))
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)               # [BLOCK_R]
    row_ok = r < m
    R = tl.load(rows_ptr + layer * m + r, mask=row_ok, other=0.0)
    ratio = tl.where(R[:, None] > 0.0, mids[None, :] / R[:, None], float("inf"))  # [BLOCK_R, LANES]
    # p = #{q : cols[q] >= ratio}: the first q with cols[q] < ratio (cols descending)
    p_lo = tl.zeros([BLOCK_R, LANES], tl.int64)
    p_hi = tl.zeros([BLOCK_R, LANES], tl.int64) + n
    cols_row = cols_ptr + layer * n
    for _ in range(N_STEPS):
        active = p_lo < p_hi
        mid = (p_lo + p_hi) // 2
        v = tl.load(cols_row + mid, mask=active, other=0.0)
        ge = v >= ratio
        p_lo = tl.where(active & ge, mid + 1, p_lo)
        p_hi = tl.where(active & (ge == 0), mid, p_hi)
    # excluded keys of row r below r * n + p, within the row's key range
    begin = tl.load(row_start_ptr + layer * (m + 1) + r, mask=row_ok, other=0)
    end = tl.load(row_start_ptr + layer * (m + 1) + r + 1, mask=row_ok, other=0)
    query = r[:, None] * n + p_lo
    k_lo = tl.zeros([BLOCK_R, LANES], tl.int64) + begin[:, None]
    k_hi = tl.zeros([BLOCK_R, LANES], tl.int64) + end[:, None]
    keys_row = keys_ptr + layer * width
    for _ in range(K_STEPS):
        active = k_lo < k_hi
        mid = (k_lo + k_hi) // 2
        key = tl.load(keys_row + mid, mask=active, other=0).to(tl.int64)
        below = key < query
        k_lo = tl.where(active & below, mid + 1, k_lo)
        k_hi = tl.where(active & (below == 0), mid, k_hi)
    above = p_lo - (k_lo - begin[:, None])
    valid = row_ok[:, None] & (s_lane[None, :] < sections)
    total = tl.sum(tl.where(valid, above, 0), axis=0)                      # [LANES]
    tl.atomic_add(counts_ptr + ((rnd % 3) * L + layer) * 64 + s_lane, total, mask=s_lane < sections)


@triton.jit
def _finish_kernel(need_ptr, hi_ptr, interval_ptr, counts_ptr, lo_ptr, L, sections, rounds, LANES: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    lo, hi = _interval(hi_ptr, interval_ptr, counts_ptr, need_ptr, layer, L, rounds, sections, tl.arange(0, LANES))
    tl.store(lo_ptr + layer, lo)


def _steps(size: int) -> int:
    """Binary-search steps that settle any range of up to ``size`` entries."""
    return max(1, int(size).bit_length())


@register_kernel("outer_threshold", "triton")
def outer_threshold(rows, cols, keys, row_start, need, hi, sections: int, rounds: int):
    L, m = rows.shape
    n, width = cols.shape[1], keys.shape[1]
    lo = torch.zeros(L, dtype=torch.float64, device=rows.device)
    if L == 0 or rounds == 0:
        return lo
    interval = torch.empty(2, L, 2, dtype=torch.float64, device=rows.device)
    counts = torch.zeros(3, L, COUNTERS, dtype=torch.int64, device=rows.device)
    lanes = triton.next_power_of_2(sections + 1)  # threshold lanes per row
    block_r = BLOCK // lanes
    grid = (max(1, triton.cdiv(m, block_r)), L)
    for rnd in range(rounds):
        _round_kernel[grid](rows, cols, keys, row_start, need, hi, interval, counts, L, m, n, width, sections, rnd,
                            N_STEPS=_steps(n), K_STEPS=_steps(width), BLOCK_R=block_r, LANES=lanes,
                            num_warps=NUM_WARPS, enable_fp_fusion=False)
    _finish_kernel[(L,)](need, hi, interval, counts, lo, L, sections, rounds, LANES=lanes, num_warps=1,
                         enable_fp_fusion=False)
    return lo
