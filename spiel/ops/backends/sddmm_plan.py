"""The ``sddmm`` plan: how the k requested entries of ``grad_output^T @ input`` are grouped for the kernels,
and the cost model that picks a strategy per backend. Plain torch ops: runs on any device.

Strategies (every backend implements all three behind the one op; see ARCHITECTURE.md):

``sparse``      only the requested dot products. CUDA: a CTA owns one *work item* (<= ``E_MAX`` entries of
                one superblock) and a split of T; it stages ``grad_output[t-chunk, row span]`` and
                ``input[t-chunk, col span]`` transposed in shared memory (one 16-byte vector = 8 tokens per
                row) and accumulates each entry's dot in registers. Triton: programs of ``BE`` consecutive
                entries (tile-major order, so a warp's loads touch few cache lines) x a split of T.
``dense_tile``  tensor-core GEMM tiles (128 x 128, T is the reduction) over the non-empty tiles only, the
                requested entries read back from the tile; optionally on *compacted* operands (only the
                distinct rows / columns the indices use, gathered once).
``dense_blas``  the vendor GEMM (cuBLAS through ``torch.mm(..., out_dtype=fp32)``) over row bands of the
                (compacted) operands into a bounded fp32 band buffer, then a gather of the entries in the
                band. Never forms [out, in]; the fallback that makes "never slower than dense" hold at high
                density.

Partial sums over T splits are reduced in a fixed order (deterministic). No atomics.

Plan layout: a 1-D int32 tensor, sections at offsets computed from (k, out, in) alone
(:func:`layout`), followed by ``code`` padding elements::

    header [HDR]                 MAGIC, k, out, in, n_tiles, n_items, nR, nC, n_ctiles, level_r, level_c,
                                 span_sum, ...
    perm [k]                     entry positions sorted by (superblock, tile in superblock, row, col)
    sperm [k]                    the same, row-major inside each sparse work item, each warp step's 32
                                 entries reordered against bank conflicts (CUDA sparse)
    tile_list [NT]               tile ids (tr * ntc + tc) of the non-empty tiles in that order
    tile_ptr [NT + 1]            entry offsets (into perm order) of each listed tile; padded with k
    tile_slot [NT]               tile id -> position in tile_list, or -1 (empty)
    items [6 * WMAX]             sparse work items: e_begin, e_end, row0, nrows, col0, ncols
    rowlist [out], collist [in]  compact -> actual row / column (first nR / nC valid, padded with 0)
    rowmap [out], colmap [in]    actual -> compact (identity when that side is not compacted)
    cperm [k], ctile_list [NT], ctile_ptr [NT + 1], ctile_slot [NT]   the same in compact coordinates

The plan's *length* is ``base_len(k, out, in) + code``: ``code`` (< ``N_CODES``) carries, without any
device-to-host copy at call time, what the host must know to launch: the compaction levels and each
backend's strategy (decided once at build time, from counts read back in one sync). Any strategy runs
correctly with any plan of the same indices (the ``strategy=`` overrides use that).
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# ---------------------------------------------------------------------------------------------------------
# constants shared with the kernels (csrc/sddmm.cu mirrors them: keep in sync)
# ---------------------------------------------------------------------------------------------------------
TILE = 128          # dense tile edge (rows and columns of [out, in])
SB = 16             # superblock edge, in tiles (2048 x 2048 elements): the sparse staging span bound
E_MAX = 8192        # entries per sparse work item (CUDA: 512 threads x 16 accumulators)
HDR = 32
MAGIC = 0x5DD301

# header slots
H_MAGIC, H_K, H_OUT, H_IN, H_NTILES, H_NITEMS, H_NR, H_NC, H_NCTILES, H_LEVEL_R, H_LEVEL_C, H_SPAN = range(12)

STRATEGIES = ("sparse", "dense_tile", "dense_blas")
BACKENDS = ("triton", "cuda")
N_LEVELS = 4                      # compaction cap = out / 2**level (level 0: not compacted)
N_CODES = N_LEVELS * N_LEVELS * len(STRATEGIES) * len(STRATEGIES)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_dims(out_features: int, in_features: int) -> Tuple[int, int]:
    """(tile rows, tile cols) of the 128 x 128 tile grid."""
    return _cdiv(out_features, TILE), _cdiv(in_features, TILE)


def max_items(k: int, out_features: int, in_features: int) -> int:
    ntr, ntc = grid_dims(out_features, in_features)
    nsb = _cdiv(ntr, SB) * _cdiv(ntc, SB)
    return nsb + k // E_MAX + 1


def layout(k: int, out_features: int, in_features: int) -> Dict[str, Tuple[int, int]]:
    """Section name -> (offset, length) in int32 elements; also ``"base"`` -> (base_len, 0)."""
    ntr, ntc = grid_dims(out_features, in_features)
    nt = ntr * ntc
    sizes = [
        ("header", HDR), ("perm", k), ("sperm", k), ("tile_list", nt), ("tile_ptr", nt + 1), ("tile_slot", nt),
        ("items", 6 * max_items(k, out_features, in_features)),
        ("rowlist", out_features), ("collist", in_features), ("rowmap", out_features), ("colmap", in_features),
        ("cperm", k), ("ctile_list", nt), ("ctile_ptr", nt + 1), ("ctile_slot", nt),
    ]
    out, off = {}, 0
    for name, n in sizes:
        out[name] = (off, n)
        off += n
    out["base"] = (off, 0)
    return out


def base_len(k: int, out_features: int, in_features: int) -> int:
    return layout(k, out_features, in_features)["base"][0]


def cap(n: int, level: int) -> int:
    """Width of the compacted operand at compaction ``level`` (level 0: not compacted, width n)."""
    if level == 0:
        return n
    return min(n, _cdiv(_cdiv(n, 1 << level), 8) * 8)


# ---------------------------------------------------------------------------------------------------------
# the code carried by the plan's length
# ---------------------------------------------------------------------------------------------------------
def encode(level_r: int, level_c: int, triton: str, cuda: str) -> int:
    s = len(STRATEGIES)
    return ((level_r * N_LEVELS + level_c) * s + STRATEGIES.index(triton)) * s + STRATEGIES.index(cuda)


def decode(code: int) -> Dict[str, object]:
    s = len(STRATEGIES)
    if not 0 <= code < N_CODES:
        raise ValueError(f"not an sddmm plan for these indices/shape (code {code} out of range)")
    cuda = code % s
    code //= s
    triton = code % s
    code //= s
    return {"level_r": code // N_LEVELS, "level_c": code % N_LEVELS, "triton": STRATEGIES[triton],
            "cuda": STRATEGIES[cuda]}


def plan_code(plan: torch.Tensor, k: int, out_features: int, in_features: int) -> Dict[str, object]:
    """Host-side facts about ``plan`` (no device sync): compaction levels and strategy per backend."""
    if plan.dim() != 1 or plan.dtype != torch.int32:
        raise ValueError("sddmm plan must be a 1-D int32 tensor made by sddmm_plan")
    return decode(plan.numel() - base_len(k, out_features, in_features))


def sections(plan: torch.Tensor, k: int, out_features: int, in_features: int) -> Dict[str, torch.Tensor]:
    """Views of the plan's sections (for the kernels and tests)."""
    return {name: plan.narrow(0, off, n) for name, (off, n) in layout(k, out_features, in_features).items()
            if name != "base"}


def with_strategy(plan: torch.Tensor, k: int, out_features: int, in_features: int, *,
                  triton: Optional[str] = None, cuda: Optional[str] = None) -> torch.Tensor:
    """A copy of ``plan`` whose code selects other strategies (for tests and benchmarks; no sync)."""
    info = plan_code(plan, k, out_features, in_features)
    for name in (triton, cuda):
        if name is not None and name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    code = encode(info["level_r"], info["level_c"], triton or info["triton"], cuda or info["cuda"])
    base = base_len(k, out_features, in_features)
    new = plan.new_zeros(base + code)
    new[:base].copy_(plan[:base])
    return new


# ---------------------------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------------------------
# Rates on one H100 SXM (bf16 inputs), fitted from `python benchmarks/bench_sddmm.py` on the H100
# (2026-11-23 runs and, for the CUDA sparse loop, session 8's rewrite; see benchmarks/NOTES.md). The CUDA
# sparse loop's staging and dot products share the load/store unit, so its time is
# fixed + staged bytes / stage rate + entry-tokens / eps (session 8 fit over 15 points, worst error 10%).
# Recalibrate from that script's output on other GPUs (SPIEL_SDDMM_COST).
COST = {
    "launch_s": 5e-6,             # fixed cost of one strategy (launches, plan reads, reduce)
    "hbm_Bps": 2.8e12,            # streaming read bandwidth
    "l2_Bps": 6.0e12,             # L2 -> SM bandwidth for staged re-reads
    "sparse_cuda_eps": 4.68e12,   # entry-tokens / s of the CUDA sparse inner loop (smem 16-B vectors)
    "sparse_cuda_stage_Bps": 5.7e12,  # staged operand bytes / s of the CUDA sparse loop (L2 -> smem, transposed)
    "sparse_cuda_fixed_s": 1.0e-5,  # fixed cost of the CUDA sparse strategy (partial reduce, tail)
    "sparse_triton_eps": 2.2e11,  # entry-tokens / s of the Triton sparse loop (L1-bound gathers)
    "tile_triton_flops": 498e12,  # tl.dot tiles incl. extraction
    "tile_cuda_flops": 152e12,    # WMMA (mma.sync) tiles incl. extraction
    "blas_flops": 746e12,         # cuBLAS bf16 -> fp32 (median of the session-3 dense_blas points)
    "partial_Bps": 2.0e12,        # partial-sum write + reduce traffic
}



def _cost_overrides() -> None:
    """``SPIEL_SDDMM_COST="sparse_cuda_eps=4e12,blas_flops=6.5e14"`` overrides COST entries (calibration)."""
    import os

    spec = os.environ.get("SPIEL_SDDMM_COST", "").strip()
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, _, val = item.partition("=")
        if key.strip() not in COST:
            raise ValueError(f"SPIEL_SDDMM_COST: unknown key {key!r} (known: {sorted(COST)})")
        COST[key.strip()] = float(val)


_cost_overrides()
_ELEM = 2  # bytes per operand element assumed by the model (bf16/fp16)


def estimate_costs(T: int, out_features: int, in_features: int, k: int, stats: Dict[str, float],
                   backend: str = "cuda", level_r: int = 0, level_c: int = 0) -> Dict[str, float]:
    """Predicted seconds of each strategy for one call. ``stats``: n_tiles, n_items, nR, nC, n_ctiles,
    span_sum (as built into the plan)."""
    c = COST
    T = max(int(T), 1)
    k = max(int(k), 0)
    floor_read = T * (out_features + in_features) * _ELEM / c["hbm_Bps"]
    res = {}
    # sparse
    if backend == "cuda":
        # staging (shared-memory stores) and the dot products (shared-memory loads) share the load/store
        # unit, so even with the next chunk's loads in flight the two terms add (the fit)
        staged = T * float(stats["span_sum"]) * _ELEM / c["sparse_cuda_stage_Bps"]
        comp = T * k / c["sparse_cuda_eps"]
        res["sparse"] = c["launch_s"] + c["sparse_cuda_fixed_s"] + max(floor_read, staged + comp)
    else:
        # each program of 128 entries reads ~ (1 G line + 2..4 X lines) per token: ~6 B per entry-token
        staged = T * k * 6.0 / c["l2_Bps"]
        comp = T * k / c["sparse_triton_eps"]
        res["sparse"] = c["launch_s"] + max(floor_read, staged, comp) + 0.3 * min(staged, comp)
    # compaction (shared by both dense strategies)
    gather = 0.0
    rows = cap(out_features, level_r) if level_r else out_features
    cols = cap(in_features, level_c) if level_c else in_features
    if level_r:
        gather += T * (out_features + 2 * rows) * _ELEM / c["hbm_Bps"]
    if level_c:
        gather += T * (in_features + 2 * cols) * _ELEM / c["hbm_Bps"]
    n_t = float(stats["n_ctiles"] if (level_r or level_c) else stats["n_tiles"])
    tile_flops = 2.0 * T * TILE * TILE * n_t
    rate = c["tile_cuda_flops"] if backend == "cuda" else c["tile_triton_flops"]
    extract = k * 16 / c["partial_Bps"]
    operand_read = T * (rows + cols) * _ELEM / c["hbm_Bps"]  # the (compacted) operands, read once
    res["dense_tile"] = c["launch_s"] + gather + max(tile_flops / rate, operand_read) + extract
    # blas over all (compacted) rows x cols; the fp32 band buffer is small enough to stay in L2
    blas_flops = 2.0 * T * rows * cols
    n_bands = len(bands(rows, cols))
    res["dense_blas"] = (c["launch_s"] * (1 + 0.2 * n_bands) + gather + max(blas_flops / c["blas_flops"], operand_read)
                         + extract)
    return res


# fp32 band buffer of the dense_blas strategy (rows per band = BAND_BYTES / (4 * cols)): 64 MiB keeps a
# 4096 x 4096 layer in one band and an 11008 x 4096 one in three, so each call launches a few large GEMMs
# (16 MiB bands cost ~10 launches per call: CPU-bound at T = 2048, see benchmarks/NOTES.md "profile")
BAND_BYTES = 64 << 20
_INT32_MAX = 2 ** 31 - 1


def band_rows(rows: int, cols: int) -> int:
    """Rows per band of the dense_blas strategy (a multiple of TILE, at least TILE)."""
    r = max(TILE, (BAND_BYTES // max(4 * cols, 1)) // TILE * TILE)
    return min(r, max(rows, 1))


def bands(rows: int, cols: int) -> List[Tuple[int, int, int, int]]:
    """The dense_blas bands ``(r0, n_rows, c0, n_cols)`` of a [rows, cols] gradient: row bands, or column
    bands when cols > rows, so a 4096 x 11008 layer runs three 4096 x 4096 GEMMs like an 11008 x 4096 one
    (its 1408-row bands ran 10-15% slower than one bf16 GEMM of the same FLOPs on the H100)."""
    if cols > rows:
        n = band_rows(cols, rows)
        return [(0, rows, c0, min(n, cols - c0)) for c0 in range(0, max(cols, 1), n)]
    n = band_rows(rows, cols)
    return [(r0, min(n, rows - r0), 0, cols) for r0 in range(0, max(rows, 1), n)]


def choose_levels(out_features: int, in_features: int, n_rows: int, n_cols: int) -> Tuple[int, int]:
    """Compaction level per side: the tightest cap that holds all used rows (cols), only if <= half."""
    def level(n_used: int, n: int) -> int:
        best = 0
        for lv in range(1, N_LEVELS):
            if n_used <= cap(n, lv) and cap(n, lv) < n:
                best = lv
        return best
    return level(n_rows, out_features), level(n_cols, in_features)


def _pick(costs: Dict[str, float], allowed=STRATEGIES) -> str:
    return min((s for s in allowed), key=lambda s: costs[s])


def choose_strategy(T: int, out_features: int, in_features: int, k: int, plan: Optional[torch.Tensor] = None,
                    backend: str = "triton", stats: Optional[Dict[str, float]] = None) -> str:
    """``"sparse" | "dense_tile" | "dense_blas"`` for ``backend``.

    With a plan: the decision built into it (read from its length: no sync). The decision does not depend
    on T: every strategy's cost is linear in T once T is more than a few hundred tokens, and below that all
    of them are launch-bound. With ``stats`` instead (the counts :func:`plan_stats` returns): the model."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if stats is None:
        if plan is None:
            raise ValueError("choose_strategy needs a plan or stats")
        return plan_code(plan, k, out_features, in_features)[backend]
    lr, lc = choose_levels(out_features, in_features, int(stats["nR"]), int(stats["nC"]))
    return _pick(estimate_costs(max(T, 1024), out_features, in_features, k, stats, backend, lr, lc))


def needs_plan(indices: torch.Tensor, out_features: int, in_features: int, *, T_hint: int = 4096) -> bool:
    """Whether a plan changes what the GPU kernels run for ``indices``.

    False exactly when :func:`build_plan` would choose dense_blas for both backends without compaction, which
    is also what ``sddmm`` runs without a plan. Decided from the counts the cost model reads (non-empty
    tiles, used rows and columns: three presence maps) with the sparse strategy's cost taken at its lower
    bound (its staging term at 0): a few launches and one small device-to-host read, instead of the full
    build's sorts and work-item reductions (~8 ms per 11008 x 4096 layer at LoRA-like density on an H100).
    """
    return needs_plan_many([(indices, out_features, in_features)], T_hint=T_hint)[0]


#: Most index entries one batched count of :func:`needs_plan_many` works on (bounds its temporaries: ~16 B per
#: entry); layers of one shape and k are counted together up to it.
COUNT_BATCH_ELEMENTS = 1 << 22


def presence_counts(items: Sequence[Tuple[torch.Tensor, int, int]]) -> Dict[int, List[int]]:
    """``i -> [non-empty tiles, used rows, used cols]`` for each item with k > 0, read back with one
    device-to-host copy per device. Items of one device, shape, k and index dtype are counted as a batch
    (a fixed number of launches per batch of up to :data:`COUNT_BATCH_ELEMENTS` entries, not per item: an index
    update of 224 layers is launch-bound otherwise)."""
    groups: Dict[tuple, List[int]] = {}
    for i, (indices, out_features, in_features) in enumerate(items):
        if indices.numel():
            key = (indices.device, int(out_features), int(in_features), indices.numel(), indices.dtype)
            groups.setdefault(key, []).append(i)
    blocks: Dict[torch.device, List[Tuple[List[int], torch.Tensor]]] = {}
    for (dev, out_f, in_f, k, _), members in groups.items():
        ntr, ntc = grid_dims(out_f, in_f)
        per = max(1, COUNT_BATCH_ELEMENTS // k)
        for start in range(0, len(members), per):
            chunk = members[start:start + per]
            L = len(chunk)
            sizes = (ntr * ntc, out_f, in_f)
            # int32 arithmetic when every flat position and every lane-offset key fits
            small = out_f * in_f <= _INT32_MAX and L * max(sizes) <= _INT32_MAX
            wdt = torch.int32 if small else torch.int64
            idx = torch.stack([items[i][0].reshape(-1) for i in chunk]).to(wdt)  # [L, k]
            r = torch.div(idx, in_f, rounding_mode="floor")
            c = idx.sub_(r * in_f)
            lane = torch.arange(L, dtype=wdt, device=dev).unsqueeze(1)
            ones = torch.ones((), dtype=torch.int32, device=dev).expand(L * k)
            counts = []
            for key, size in (((r // TILE) * ntc + c // TILE, sizes[0]), (r, sizes[1]), (c, sizes[2])):
                present = torch.zeros(L * size, dtype=torch.int32, device=dev)
                present.index_put_(((key + lane * size).reshape(-1),), ones)
                counts.append(present.view(L, size).sum(1))
            blocks.setdefault(dev, []).append((chunk, torch.stack(counts, 1)))  # [L, 3]
    host: Dict[int, List[int]] = {}
    for parts in blocks.values():  # one read-back per device
        rows = torch.cat([cnt for _, cnt in parts]).tolist()
        members = [i for chunk, _ in parts for i in chunk]
        host.update(zip(members, rows))
    return host


def needs_plan_many(items: Sequence[Tuple[torch.Tensor, int, int]], *, T_hint: int = 4096) -> List[bool]:
    """:func:`needs_plan` for many ``(indices, out_features, in_features)`` at once: the presence maps of every
    item are counted on its device (batched over items of one shape and k) and read back in one
    device-to-host copy per device (an index update of 224 layers synchronises once instead of 224 times)."""
    host = presence_counts(items)
    result = []
    for i, (indices, out_features, in_features) in enumerate(items):
        if i not in host:
            result.append(True)  # k = 0: the plan says "nothing to compute"
            continue
        out_features, in_features = int(out_features), int(in_features)
        n_tiles, n_r, n_c = host[i]
        if choose_levels(out_features, in_features, n_r, n_c) != (0, 0):
            result.append(True)
            continue
        stats = {"n_tiles": n_tiles, "n_items": 0, "nR": n_r, "nC": n_c, "n_ctiles": n_tiles, "span_sum": 0}
        result.append(any(_pick(estimate_costs(T_hint, out_features, in_features, indices.numel(), stats, backend))
                          != "dense_blas" for backend in BACKENDS))
    return result


def plan_stats(plan: torch.Tensor, k: int, out_features: int, in_features: int) -> Dict[str, int]:
    """The plan's counts (one device-to-host copy: for tests, benchmarks and reports, not the hot path)."""
    h = plan[:HDR].tolist()
    if h[H_MAGIC] != MAGIC:
        raise ValueError("not an sddmm plan (bad magic)")
    return {"n_tiles": h[H_NTILES], "n_items": h[H_NITEMS], "nR": h[H_NR], "nC": h[H_NC],
            "n_ctiles": h[H_NCTILES], "level_r": h[H_LEVEL_R], "level_c": h[H_LEVEL_C], "span_sum": h[H_SPAN]}


# ---------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------
def _group(keys_sorted_tile: torch.Tensor, nt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the tile id of each entry in sorted order: (tile_list [nt], tile_ptr [nt+1], tile_slot [nt], count)."""
    dev = keys_sorted_tile.device
    k = keys_sorted_tile.numel()
    pos = torch.arange(k, device=dev)
    start = torch.ones(k, dtype=torch.bool, device=dev)
    if k > 1:
        start[1:] = keys_sorted_tile[1:] != keys_sorted_tile[:-1]
    slot = torch.cumsum(start.to(torch.int64), 0) - 1
    count = slot[-1:] + 1 if k else torch.zeros(1, dtype=torch.int64, device=dev)
    dummy = torch.full_like(slot, nt + 1)
    where = torch.where(start, slot, dummy)
    tile_list = torch.zeros(nt + 2, dtype=torch.int64, device=dev).scatter_(0, where, keys_sorted_tile)[:nt]
    tile_ptr = torch.full((nt + 2,), k, dtype=torch.int64, device=dev).scatter_(0, where, pos)[:nt + 1]
    slot_of = torch.full((nt + 1,), -1, dtype=torch.int64, device=dev)
    slot_of.scatter_(0, torch.where(start, keys_sorted_tile, torch.full_like(slot, nt)), slot)
    return tile_list, tile_ptr, slot_of[:nt], count


def _used(idx: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(list [n] of used values ascending padded with 0, rank map [n] (value -> rank), count [1])."""
    dev = idx.device
    present = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    present.scatter_(0, idx, torch.ones_like(idx))
    present = present[:n]
    rank = torch.cumsum(present, 0) - 1
    count = present.sum().reshape(1)
    where = torch.where(present.bool(), rank, torch.full_like(rank, n))
    lst = torch.zeros(n + 1, dtype=torch.int64, device=dev).scatter_(0, where, torch.arange(n, device=dev))[:n]
    return lst, rank.clamp(min=0), count


def _swz_class(row: torch.Tensor) -> torch.Tensor:
    """Shared-memory bank class (16-byte bank group) of staged row ``row`` (csrc/sddmm.cu ``swz``)."""
    return (row ^ (row >> 3)) & 7


def step_wavefronts(g_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """Shared-memory wavefronts of one CUDA sparse warp step per group: [G, 32] staged grad_output rows and
    input rows in lane order -> [G]. A 16-byte load is served per quarter-warp (8 lanes), one wavefront per
    distinct row of the most loaded bank class (equal rows are one broadcast)."""
    total = torch.zeros(g_rows.shape[0], dtype=torch.int64, device=g_rows.device)
    for rows in (g_rows, x_rows):
        q = rows.view(-1, 4, 8)
        cls = _swz_class(q)
        # distinct rows per (quarter, class): count a lane unless an earlier lane of its quarter has its row
        same = q.unsqueeze(3) == q.unsqueeze(2)  # [G, 4, 8, 8]
        earlier = torch.ones(8, 8, dtype=torch.bool, device=rows.device).tril(-1)
        first = ~(same & earlier).any(3)
        per_class = torch.zeros(q.shape[0], 4, 8, dtype=torch.int64, device=rows.device)
        per_class.scatter_add_(2, cls, first.to(torch.int64))
        total += per_class.amax(2).sum(1)
    return total


def _step_geometry(plan: torch.Tensor, indices: torch.Tensor, out_features: int, in_features: int):
    """Per position of the plan's ``sperm``: (sperm as int64, staged grad_output row, staged input row, lane in
    its CUDA sparse warp step (32 consecutive positions from the item's start), whether that step is full, step
    id). Staged rows as csrc/sddmm.cu stages 16-bit operands (spans aligned to 8 columns)."""
    k = indices.numel()
    dev = indices.device
    secs = sections(plan, k, out_features, in_features)
    sperm = secs["sperm"].long()
    it = secs["items"].view(-1, 6).long()
    e_begin, e_end, rmin, nrows, cmin = it[:, 0], it[:, 1], it[:, 2], it[:, 3], it[:, 4]
    pos = torch.arange(k, device=dev)
    # valid items come first with increasing ends; unused item slots are zero rows after them
    item = torch.searchsorted(torch.where(e_end > 0, e_end, k + 1), pos, right=True)
    idx = indices.reshape(-1).long().index_select(0, sperm)
    r = torch.div(idx, in_features, rounding_mode="floor")
    c = idx - r * in_features
    row0a = (rmin // 8 * 8).index_select(0, item)
    col0a = (cmin // 8 * 8).index_select(0, item)
    nrows_a = ((rmin + nrows + 7) // 8 * 8).index_select(0, item) - row0a
    lane0 = (pos - e_begin.index_select(0, item)) % 32
    full = (e_end.index_select(0, item) - (pos - lane0)) >= 32
    step = torch.cumsum((lane0 == 0).to(torch.int64), 0) - 1
    return sperm, r - row0a, nrows_a + c - col0a, lane0, full, step


def _greedy_lanes(g_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """[G, 32] staged rows of G warp steps in row-major entry order -> [G, 32] lane of each entry.

    Entries in order each take the quarter-warp (with a free lane) where they add the fewest bank conflicts:
    grad_output rows of their class other than their own row (equal rows are one broadcast) plus input rows of
    their class. A fixed number of launches per call, whatever G (state: per quarter and class, flattened)."""
    G = g_rows.shape[0]
    dev = g_rows.device
    i64 = torch.int64
    off4 = torch.arange(4, device=dev) * 8
    g_cls = _swz_class(g_rows.clamp_min(0))
    x_cls = _swz_class(x_rows.clamp_min(0))
    cnt_g = torch.zeros(G, 32, dtype=i64, device=dev)
    last_g = torch.full((G, 32), -1, dtype=i64, device=dev)
    cnt_x = torch.zeros(G, 32, dtype=i64, device=dev)
    fill = torch.zeros(G, 4, dtype=i64, device=dev)
    ones = torch.ones(G, 1, dtype=i64, device=dev)
    lanes = torch.empty(G, 32, dtype=i64, device=dev)
    for e in range(32):
        gr = g_rows[:, e:e + 1]
        ig = g_cls[:, e:e + 1] + off4                                   # [G, 4]: (quarter, class) slots
        ix = x_cls[:, e:e + 1] + off4
        seen = last_g.gather(1, ig) == gr                               # own row already in that quarter
        cost = torch.where(seen, 0, cnt_g.gather(1, ig)) + cnt_x.gather(1, ix)
        cost.masked_fill_(fill >= 8, 1 << 20)
        q = cost.argmin(1, keepdim=True)                                # first minimum: deterministic
        lanes[:, e:e + 1] = q * 8 + fill.gather(1, q)
        fill.scatter_add_(1, q, ones)
        slot_g = ig.gather(1, q)
        cnt_g.scatter_add_(1, slot_g, (~seen.gather(1, q)).to(i64))
        last_g.scatter_(1, slot_g, gr)
        cnt_x.scatter_add_(1, ix.gather(1, q), ones)
    return lanes


#: Most warp steps one greedy pass of :func:`balance_plans` works on (bounds its ~1 KiB per step of state).
BALANCE_STEPS = 1 << 17


@torch.no_grad()
def balance_plans(entries: Sequence[Tuple[torch.Tensor, torch.Tensor, int, int]]) -> None:
    """Reorder, in place, the ``sperm`` section of each ``(plan, indices, out, in)`` against shared-memory bank
    conflicts of the CUDA sparse kernel, all plans of one device in one greedy pass (:func:`build_plan` calls it
    for its own plan; :func:`spiel.nn.linear.rebuild_sddmm_plans` builds unbalanced plans and balances them
    together: ~20 launches per step of the greedy, not per plan).

    Each full warp step (32 consecutive positions from its item's start, in row-major order) is dealt to the 4
    quarter-warps: a 16-byte shared load is served per quarter-warp, one wavefront per distinct 16-byte row of
    its most loaded bank class (8 classes: csrc/sddmm.cu ``swz`` of the staged row). Row-major order alone keeps
    a step's few grad_output rows together but leaves the input rows random (~10 wavefronts per load at 0.1%
    density; 4 is the minimum); on real plans of 0.1-2.4% density the greedy gives 10-16% fewer wavefronts
    than row-major order (:func:`step_wavefronts`). Partial steps keep row-major order. Any order is correct:
    the kernel writes position j's result to ``sperm[j]``."""
    by_device: Dict[torch.device, list] = defaultdict(list)
    for plan, indices, out_f, in_f in entries:
        if indices.numel():
            by_device[indices.device].append((plan, indices, int(out_f), int(in_f)))
    for group in by_device.values():
        geo, bounds = [], []
        for plan, indices, out_f, in_f in group:
            geo.append(_step_geometry(plan, indices, out_f, in_f))
            bounds.append(indices.numel() // 32 + max_items(indices.numel(), out_f, in_f) + 1)  # >= steps
        dev = group[0][1].device
        base = list(itertools.accumulate(bounds, initial=0))[:-1]  # first step row of each plan
        total = sum(bounds)
        g_buf = torch.full((total, 32), -1, dtype=torch.int64, device=dev)
        x_buf = torch.full((total, 32), -1, dtype=torch.int64, device=dev)
        for (sperm, g_row, x_row, lane0, full, step), b0 in zip(geo, base):
            g_buf[step + b0, lane0] = g_row
            x_buf[step + b0, lane0] = x_row
        lanes = torch.cat([_greedy_lanes(g_buf[s:s + BALANCE_STEPS], x_buf[s:s + BALANCE_STEPS])
                           for s in range(0, total, BALANCE_STEPS)])
        for (plan, indices, out_f, in_f), (sperm, g_row, x_row, lane0, full, step), b0 in zip(group, geo, base):
            lane = torch.where(full, lanes[step + b0, lane0], lane0)
            new = torch.empty_like(sperm)
            new[torch.arange(sperm.numel(), device=dev) - lane0 + lane] = sperm
            off, n = layout(indices.numel(), out_f, in_f)["sperm"]
            plan.narrow(0, off, n).copy_(new)


def build_plan(indices: torch.Tensor, out_features: int, in_features: int, *, triton: Optional[str] = None,
               cuda: Optional[str] = None, compaction: bool = True, T_hint: int = 4096,
               balance: bool = True) -> torch.Tensor:
    """The plan for ``indices`` (unique, in range, any order). One device-to-host copy of a few counts (to
    decide the strategies); call once per index update, never in forward/backward.

    ``triton`` / ``cuda`` force that backend's strategy; ``compaction=False`` disables compaction;
    ``balance=False`` leaves ``sperm`` in row-major order, for a caller that balances many plans at once
    (:func:`balance_plans`)."""
    out_features, in_features = int(out_features), int(in_features)
    dev = indices.device
    k = indices.numel()
    if k >= 2**31 - 1:
        raise ValueError("sddmm plan: more than 2**31 - 2 indices")
    for name in (triton, cuda):
        if name is not None and name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    lay = layout(k, out_features, in_features)
    ntr, ntc = grid_dims(out_features, in_features)
    nt = ntr * ntc
    nsbc = _cdiv(ntc, SB)
    i64 = torch.int64
    idx = indices.reshape(-1).to(i64)
    r = idx // in_features
    c = idx - r * in_features
    tr, tc = r // TILE, c // TILE
    sb = (tr // SB) * nsbc + tc // SB
    tile_in_sb = (tr % SB) * SB + tc % SB
    local = (r % TILE) * TILE + c % TILE
    key = (sb * (SB * SB) + tile_in_sb) * (TILE * TILE) + local
    perm = torch.sort(key).indices if k else torch.zeros(0, dtype=i64, device=dev)
    r_s, c_s = r[perm], c[perm]
    tid_s = (r_s // TILE) * ntc + c_s // TILE
    tile_list, tile_ptr, tile_slot, n_tiles = _group(tid_s, nt)

    # sparse work items: split each superblock's run into chunks of <= E_MAX entries
    wmax = lay["items"][1] // 6
    pos = torch.arange(k, device=dev)
    sb_s = sb[perm]
    sb_start = torch.ones(k, dtype=torch.bool, device=dev)
    if k > 1:
        sb_start[1:] = sb_s[1:] != sb_s[:-1]
    first = torch.cummax(torch.where(sb_start, pos, torch.zeros_like(pos)), 0).values if k else pos
    item_start = sb_start | ((pos - first) % E_MAX == 0)
    item = torch.cumsum(item_start.to(i64), 0) - 1
    n_items = item[-1:] + 1 if k else torch.zeros(1, dtype=i64, device=dev)
    items = torch.zeros(6, wmax, dtype=i64, device=dev)
    if k:
        e_end = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, pos + 1, "amax", include_self=False)
        e_begin = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, pos, "amin", include_self=False)
        rmin = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, r_s, "amin", include_self=False)
        rmax = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, r_s, "amax", include_self=False)
        cmin = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, c_s, "amin", include_self=False)
        cmax = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, c_s, "amax", include_self=False)
        valid = torch.arange(wmax, device=dev) < n_items
        nrows = torch.where(valid, rmax - rmin + 1, torch.zeros_like(rmax))
        ncols = torch.where(valid, cmax - cmin + 1, torch.zeros_like(cmax))
        items = torch.stack([e_begin, e_end, rmin, nrows, cmin, ncols])
        span_sum = (nrows + ncols).sum().reshape(1)
    else:
        span_sum = torch.zeros(1, dtype=i64, device=dev)
    items = items.t().contiguous().reshape(-1)  # item-major: 6 ints per item
    # row-major order inside each item (same item ranges): a CUDA sparse warp step (32 consecutive positions
    # from the item start) then mostly shares a few grad_output rows (shared-memory broadcasts); its lanes are
    # then dealt to quarter-warps against bank conflicts (balance_plans, at the end)
    if k:
        sperm = perm[torch.sort(item * (out_features * in_features) + idx[perm]).indices]
    else:
        sperm = perm

    rowlist, rowrank, n_r = _used(r, out_features)
    collist, colrank, n_c = _used(c, in_features)

    # the one sync: counts that decide the strategies and the compaction levels
    st = torch.cat([n_tiles, n_items, n_r, n_c, span_sum]).tolist()
    stats = {"n_tiles": st[0], "n_items": st[1], "nR": st[2], "nC": st[3], "span_sum": st[4]}
    lr, lc = choose_levels(out_features, in_features, stats["nR"], stats["nC"]) if compaction else (0, 0)
    if lr == 0:
        rowlist = torch.arange(out_features, device=dev)
        rowrank = rowlist
    if lc == 0:
        collist = torch.arange(in_features, device=dev)
        colrank = collist
    if lr or lc:
        cr, cc = rowrank[r], colrank[c]
        ckey = ((cr // TILE) * ntc + cc // TILE) * (TILE * TILE) + (cr % TILE) * TILE + cc % TILE
        cperm = torch.sort(ckey).indices
        ctid_s = ckey[cperm] // (TILE * TILE)
        ctile_list, ctile_ptr, ctile_slot, n_ct = _group(ctid_s, nt)
        # bound for the model (no second sync): tiles of the used compact rectangle
        stats["n_ctiles"] = min(_cdiv(max(stats["nR"], 1), TILE) * _cdiv(max(stats["nC"], 1), TILE), nt)
    else:
        cperm, ctile_list, ctile_ptr, ctile_slot, n_ct = perm, tile_list, tile_ptr, tile_slot, n_tiles
        stats["n_ctiles"] = stats["n_tiles"]

    choice = {}
    for be, forced in (("triton", triton), ("cuda", cuda)):
        if forced is not None:
            choice[be] = forced
        else:
            choice[be] = _pick(estimate_costs(T_hint, out_features, in_features, k, stats, be, lr, lc))
    code = encode(lr, lc, choice["triton"], choice["cuda"])

    header = torch.zeros(HDR, dtype=i64, device=dev)
    header[H_MAGIC] = MAGIC
    header[H_K] = k
    header[H_OUT] = out_features
    header[H_IN] = in_features
    header[H_NTILES] = n_tiles[0]
    header[H_NITEMS] = n_items[0]
    header[H_NR] = n_r[0]
    header[H_NC] = n_c[0]
    header[H_NCTILES] = n_ct[0]
    header[H_LEVEL_R] = lr
    header[H_LEVEL_C] = lc
    header[H_SPAN] = span_sum[0]
    parts = [header, perm, sperm, tile_list, tile_ptr, tile_slot, items, rowlist, collist, rowrank, colrank, cperm,
             ctile_list, ctile_ptr, ctile_slot, torch.zeros(code, dtype=i64, device=dev)]
    plan = torch.cat([p.reshape(-1).to(i64) for p in parts]).to(torch.int32)
    assert plan.numel() == lay["base"][0] + code
    if balance:
        balance_plans([(plan, indices, out_features, in_features)])
    return plan


def cuda_sddmm(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, out_features: int,
               in_features: int, plan: Optional[torch.Tensor] = None, strategy: Optional[str] = None) -> torch.Tensor:
    """The CUDA backend's kernel (``torch.ops.spiel._cuda_sddmm``) with an optional ``strategy`` override
    (carried by a re-coded copy of the plan: the C++ side reads the strategy from the plan's length).
    Without a plan and strategy the C++ side runs dense_blas. fp32 inputs always run the sparse kernel."""
    k = indices.numel()
    if strategy is not None:
        if plan is None:
            plan = build_plan(indices, out_features, in_features)
        plan = with_strategy(plan, k, out_features, in_features, cuda=strategy)
    return torch.ops.spiel._cuda_sddmm(grad_output, input, indices, int(out_features), int(in_features), plan)
