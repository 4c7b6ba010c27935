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
                distinct rows / columns the indices use, gathered once). CUDA on sm90a (:func:`cuda_wgmma`):
                a persistent wgmma + TMA-multicast kernel over 128 x 256 tiles that writes the entries from
                its accumulators (~0.93-1.0x cuBLAS + gather); elsewhere WMMA.
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

import functools
import itertools
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


# ---------------------------------------------------------------------------------------------------------
# row plans: a sorted index set's row starts, for the CUDA wgmma dense_tile without a full plan
# ---------------------------------------------------------------------------------------------------------
ROW_MAGIC = 0x5DD3A0


def row_plan_len(out_features: int) -> int:
    """Length of a row plan (never the length of a full plan: those hold >= 2 (out + in) entries)."""
    return HDR + out_features + 1


def is_row_plan(plan: Optional[torch.Tensor], out_features: int) -> bool:
    """Whether ``plan`` is a row plan (:func:`build_row_plan`): told by its length, no device read."""
    return plan is not None and plan.dim() == 1 and plan.numel() == row_plan_len(int(out_features))


def row_plan_applies(device: torch.device, out_features: int, in_features: int) -> bool:
    """Whether a row plan changes what runs: the CUDA wgmma kernel (:func:`cuda_wgmma`) takes sorted index sets
    through it; its TMA rows need feature counts divisible by 8."""
    return out_features % 8 == 0 and in_features % 8 == 0 and cuda_wgmma(device)


def build_row_plan(indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """int32 [HDR + out + 1]: header (ROW_MAGIC, k, out, in), then the position in ``indices`` of each row's first
    entry (row ``out`` = k). ``indices`` must be sorted and unique (a layer's own index set, without candidates);
    the CUDA backend then runs the wgmma dense_tile from it when that applies, else cuBLAS bands, and the other
    backends ignore it. O(out) memory against ~16 B per delta for a full plan; one searchsorted, no sync."""
    return build_row_plans([(indices, out_features, in_features)])[0]


def build_row_plans(items: Sequence[Tuple[torch.Tensor, int, int]]) -> List[torch.Tensor]:
    """:func:`build_row_plan` for many ``(indices, out_features, in_features)``: the row boundaries and the
    header are made once per (shape, k, index dtype, device), then each plan costs two launches (a searchsorted
    into the plan and the header's copy) -- an index update rebuilds every layer's plan at once."""
    plans: List[torch.Tensor] = []
    shared: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
    for indices, out_features, in_features in items:
        out_features, in_features = int(out_features), int(in_features)
        idx = indices.reshape(-1)
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"build_row_plan: indices must be int32 or int64, got {idx.dtype}")
        if idx.numel() >= 2**31:  # its entries are int32 list positions
            raise ValueError(f"build_row_plan: indices must hold fewer than 2**31 entries, got {idx.numel()}")
        key = (out_features, in_features, idx.numel(), idx.dtype, idx.device)
        if key not in shared:
            # boundaries in the indices' dtype (int32 indices imply out * in < 2**31; the last one is clamped)
            bounds = torch.arange(out_features + 1, dtype=torch.int64, device=idx.device) * in_features
            if idx.dtype == torch.int32:
                bounds = bounds.clamp_(max=2**31 - 1).to(torch.int32)
            head = torch.zeros(HDR, dtype=torch.int32)
            head[H_MAGIC], head[H_K], head[H_OUT], head[H_IN] = ROW_MAGIC, idx.numel(), out_features, in_features
            shared[key] = bounds, head.to(idx.device)
        bounds, head = shared[key]
        plan = torch.empty(row_plan_len(out_features), dtype=torch.int32, device=idx.device)
        plan[:HDR].copy_(head)
        torch.searchsorted(idx, bounds, out_int32=True, out=plan[HDR:])
        plans.append(plan)
    return plans


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
    "tile_wgmma_flops": 665e12,   # sm90a wgmma tiles (TMA multicast, persistent; csrc/sddmm_sm90.cuh)
    "tile_wgmma_build_s": 2.5e-6,  # one round of its bitmap builder (768 entries per CTA, dependent loads)
    "wgmma_clusters": 66,         # its resident 2-CTA clusters (132 SMs)
    "blas_flops": 690e12,         # cuBLAS bf16 -> fp32 over the bands (session 11 fit, bands' fixed cost apart)
    "band_s": 1e-6,               # fixed cost of one more dense_blas band (GEMM + gather launches)
    "blas_out_Bps": 5.6e12,       # fp32 band bytes written (partly hidden under the GEMM: an effective rate)
    "dense_entry_s": 2.7e-11,     # per requested entry, every dense strategy (its random 32-B sector write/read)
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


def cuda_wgmma(device: torch.device) -> bool:
    """Whether the CUDA backend's dense_tile strategy runs the sm90a wgmma kernel on ``device`` (an H100/H200
    and an extension built for ``9.0a``); otherwise it runs the portable WMMA kernel."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_wgmma(index)


@functools.lru_cache(maxsize=None)
def _cuda_wgmma(index: int) -> bool:
    try:
        from spiel import _C
    except Exception:  # the extension is optional
        return False
    query = getattr(_C, "sddmm_wgmma_available", None)
    return bool(query(index)) if query is not None else False


def estimate_costs(T: int, out_features: int, in_features: int, k: int, stats: Dict[str, float],
                   backend: str = "cuda", level_r: int = 0, level_c: int = 0, *,
                   wgmma: bool = False) -> Dict[str, float]:
    """Predicted seconds of each strategy for one call. ``stats``: n_tiles, n_items, nR, nC, n_ctiles,
    span_sum (as built into the plan). ``wgmma``: the CUDA dense_tile strategy runs the sm90a kernel
    (:func:`cuda_wgmma`; it needs feature counts that are multiples of 8)."""
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
    extract = k * c["dense_entry_s"]
    operand_read = T * (rows + cols) * _ELEM / c["hbm_Bps"]  # the (compacted) operands, read once
    if backend == "cuda" and wgmma and out_features % 8 == 0 and in_features % 8 == 0:
        # 128 x 256 tiles in pairs (one per 2-CTA cluster); the bitmap builder of each CTA walks its tile's
        # entries once per unit (every T split) in rounds of 768, overlapped with the mainloop unless a tile
        # holds thousands of entries (concentrated masks)
        clusters = int(c["wgmma_clusters"])
        n_pairs = max(1, _cdiv(_cdiv(rows, TILE), 2) * _cdiv(cols, 2 * TILE))
        splits = max(1, min(_cdiv(clusters, n_pairs), max(T // 256, 1), 64)) if n_pairs < clusters else 1
        waves = _cdiv(n_pairs * splits, clusters)
        build = waves * _cdiv(_cdiv(k, 2 * n_pairs), 768) * c["tile_wgmma_build_s"]
        mainloop = max(tile_flops / c["tile_wgmma_flops"], operand_read)
        res["dense_tile"] = c["launch_s"] + gather + max(mainloop, build) + extract
    else:
        rate = c["tile_cuda_flops"] if backend == "cuda" else c["tile_triton_flops"]
        res["dense_tile"] = c["launch_s"] + gather + max(tile_flops / rate, operand_read) + extract
    # blas over all (compacted) rows x cols; the fp32 band buffer is small enough to stay in L2
    blas_flops = 2.0 * T * rows * cols
    n_bands = len(bands(rows, cols))
    res["dense_blas"] = (c["launch_s"] + n_bands * c["band_s"] + 4.0 * rows * cols / c["blas_out_Bps"] + gather
                         + max(blas_flops / c["blas_flops"], operand_read) + extract)
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
                    backend: str = "triton", stats: Optional[Dict[str, float]] = None, *, wgmma: bool = False) -> str:
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
    return _pick(estimate_costs(max(T, 1024), out_features, in_features, k, stats, backend, lr, lc,
                                wgmma=wgmma and backend == "cuda"))


def needs_plan(indices: torch.Tensor, out_features: int, in_features: int, *, T_hint: int = 4096) -> bool:
    """Whether a plan changes what the GPU kernels run for ``indices``.

    False exactly when :func:`build_plan` would choose dense_blas for both backends without compaction, which
    is also what ``sddmm`` runs without a plan. Decided from the counts the cost model reads (non-empty
    tiles, used rows and columns: three presence maps) with the sparse strategy's cost taken at its lower
    bound (its staging term at 0): a few launches and one small device-to-host read, instead of the full
    build's sorts and work-item reductions (~8 ms per 11008 x 4096 layer at LoRA-like density on an H100).
    """
    return needs_plan_many([(indices, out_features, in_features)], T_hint=T_hint)[0]


#: Most index entries one batched count of :func:`needs_plan_many` works on (bounds its temporaries: ~16-24 B per
#: entry); layers of one shape and k are counted together up to it. 2**23: ~15 launches per batch, 20 batches for
#: the 224 layers of a 7B index update (host-bound, like the rest of the update).
COUNT_BATCH_ELEMENTS = 1 << 23


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
        n_tiles, n_r, n_c = host[i]
        # the layers of one model share a few (shape, k, counts): decided once each (~60 us of Python per call)
        result.append(_needs_plan_for(int(out_features), int(in_features), indices.numel(), n_tiles, n_r, n_c,
                                      int(T_hint), tuple(COST.values())))
    return result


@functools.lru_cache(maxsize=4096)
def _needs_plan_for(out_features: int, in_features: int, k: int, n_tiles: int, n_r: int, n_c: int,
                    T_hint: int, cost: tuple) -> bool:
    """:func:`needs_plan`'s decision from the presence counts; ``cost`` (the values of :data:`COST`) is part of
    the cache key, so a recalibration is never answered from stale entries."""
    if choose_levels(out_features, in_features, n_r, n_c) != (0, 0):
        return True
    stats = {"n_tiles": n_tiles, "n_items": 0, "nR": n_r, "nC": n_c, "n_ctiles": n_tiles, "span_sum": 0}
    # the CUDA wgmma dense_tile is not a reason to build a plan: plans cost ~16 B per delta (2.5 GB for a 7B
    # model at LoRA-r64 density, session 11) where the plan-free cuBLAS bands run within ~5% of it
    return any(_pick(estimate_costs(T_hint, out_features, in_features, k, stats, backend)) != "dense_blas"
               for backend in BACKENDS)


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
def _group_rows(tid: torch.Tensor, nt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``tid`` [L, k] (the tile id of each entry, in sorted order): (tile_list [L, nt], tile_ptr
    [L, nt + 1], tile_slot [L, nt], count [L]) -- the non-empty tiles in order, their entry offsets (padded with
    k) and the tile -> slot map (-1: empty)."""
    L, k = tid.shape
    dev = tid.device
    pos = torch.arange(k, device=dev).expand(L, k)
    start = torch.ones(L, k, dtype=torch.bool, device=dev)
    start[:, 1:] = tid[:, 1:] != tid[:, :-1]
    slot = torch.cumsum(start, 1) - 1
    count = slot[:, -1] + 1 if k else torch.zeros(L, dtype=torch.int64, device=dev)
    # positions that start no tile write to a dummy slot past the end, cut off below
    where = torch.where(start, slot, nt + 1)
    tile_list = torch.zeros(L, nt + 2, dtype=torch.int64, device=dev).scatter_(1, where, tid)[:, :nt]
    tile_ptr = torch.full((L, nt + 2), k, dtype=torch.int64, device=dev).scatter_(1, where, pos)[:, :nt + 1]
    slot_of = torch.full((L, nt + 1), -1, dtype=torch.int64, device=dev)
    slot_of.scatter_(1, torch.where(start, tid, nt), slot)
    return tile_list, tile_ptr, slot_of[:, :nt], count


def _used_rows(v: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``v`` [L, k] (values in [0, n)): (used values ascending padded with 0 [L, n], rank map
    value -> rank [L, n], count [L])."""
    L = v.shape[0]
    dev = v.device
    present = torch.zeros(L, n + 1, dtype=torch.int64, device=dev)
    present.scatter_(1, v, 1)
    present = present[:, :n]
    rank = torch.cumsum(present, 1) - 1
    count = present.sum(1)
    where = torch.where(present.bool(), rank, n)
    lst = torch.zeros(L, n + 1, dtype=torch.int64, device=dev).scatter_(
        1, where, torch.arange(n, device=dev).expand(L, n))[:, :n]
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
    conflicts of the CUDA sparse kernel, all plans of one device in one greedy pass (:func:`build_plans` calls it
    for all the plans it built: ~20 launches per step of the greedy, not per plan). It costs ~1 ms per 7B layer
    on an H100 for a 2-5% faster sparse kernel at 0.1% density (2-10% at 0.5-2.4%), so index updates skip it
    (:func:`spiel.nn.linear.rebuild_sddmm_plans` with ``balance=False``).

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


#: Most index entries (L * k) one batched group of :func:`build_plans` works on: bounds its temporaries (~15 int64
#: per entry at once, ~250 MiB at 2**21) below the drop's batch of an index update.
PLAN_BATCH_ELEMENTS = 1 << 21


def build_plan(indices: torch.Tensor, out_features: int, in_features: int, *, triton: Optional[str] = None,
               cuda: Optional[str] = None, compaction: bool = True, T_hint: int = 4096,
               balance: bool = True) -> torch.Tensor:
    """The plan for ``indices`` (unique, in range, any order). One device-to-host copy of a few counts (to
    decide the strategies); call once per index update, never in forward/backward.

    ``triton`` / ``cuda`` force that backend's strategy; ``compaction=False`` disables compaction;
    ``balance=False`` leaves ``sperm`` in row-major order, for a caller that balances many plans at once
    (:func:`balance_plans`). :func:`build_plans` builds many at once."""
    return build_plans([(indices, out_features, in_features)], triton=triton, cuda=cuda, compaction=compaction,
                       T_hint=T_hint, balance=balance)[0]


@torch.no_grad()
def build_plans(items: Sequence[Tuple[torch.Tensor, int, int]], *, triton: Optional[str] = None,
                cuda: Optional[str] = None, compaction: bool = True, T_hint: int = 4096,
                balance: bool = True) -> List[torch.Tensor]:
    """:func:`build_plan` of every ``(indices, out_features, in_features)``: the index sets of one device, shape, k
    and dtype are sorted, grouped and counted together as [L, k] batches (of at most
    :data:`PLAN_BATCH_ELEMENTS` entries), and the counts that decide the strategies are read back with one
    device-to-host copy per device. An index update of 224 layers then runs ~20 launches per layer instead of
    ~200 and one read-back instead of one per layer (each a wait for the GPU). Only the layers that compaction
    applies to (their used rows or columns at most half the side) take a few launches of their own. Memory: the
    working set of one batch (~15 int64 per entry) plus the finished int32 sections of every plan."""
    for name in (triton, cuda):
        if name is not None and name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, (indices, out_f, in_f) in enumerate(items):
        if indices.numel() >= 2**31 - 1:
            raise ValueError("sddmm plan: more than 2**31 - 2 indices")
        groups[(indices.device, int(out_f), int(in_f), indices.numel(), indices.dtype)].append(i)
    parts = []  # (members, out_f, in_f, k, batched tensors, counts [L, 5])
    for (dev, out_f, in_f, k, _), members in groups.items():
        per = max(1, PLAN_BATCH_ELEMENTS // max(k, 1))
        for s0 in range(0, len(members), per):
            chunk = members[s0:s0 + per]
            idx = torch.stack([items[i][0].reshape(-1) for i in chunk]).to(torch.int64)
            parts.append((chunk, out_f, in_f, k) + _plan_rows(idx, out_f, in_f))
    # the one sync per device: the counts that decide the strategies and the compaction levels
    host: Dict[int, List[int]] = {}
    by_device: Dict[torch.device, list] = defaultdict(list)
    for part in parts:
        by_device[part[4]["perm"].device].append(part)
    for plist in by_device.values():
        counts = torch.cat([p[-1] for p in plist]).tolist()
        host.update(zip([i for p in plist for i in p[0]], counts))
    plans: List[Optional[torch.Tensor]] = [None] * len(items)
    for chunk, out_f, in_f, k, t, _ in parts:
        built = _assemble(t, [items[i][0] for i in chunk], [host[i] for i in chunk], out_f, in_f, k, triton, cuda,
                          compaction, T_hint)
        for i, plan in zip(chunk, built):
            plans[i] = plan
    if balance:
        balance_plans([(plan, indices, int(out_f), int(in_f)) for plan, (indices, out_f, in_f) in zip(plans, items)])
    return plans


def _plan_rows(idx: torch.Tensor, out_features: int, in_features: int):
    """The plan sections of L index sets of one shape and k at once (``idx`` int64 [L, k]): a dict of [L, ...]
    tensors and the counts [L, 5] (non-empty tiles, items, used rows, used columns, staged span)."""
    L, k = idx.shape
    dev = idx.device
    ntr, ntc = grid_dims(out_features, in_features)
    nt = ntr * ntc
    nsbc = _cdiv(ntc, SB)
    wmax = layout(k, out_features, in_features)["items"][1] // 6
    i64 = torch.int64
    r = torch.div(idx, in_features, rounding_mode="floor")
    c = idx - r * in_features
    tr, tc = r // TILE, c // TILE
    sb = (tr // SB) * nsbc + tc // SB
    # entries sorted by (superblock, tile in superblock, row, col): unique keys, so any sort gives this order
    key = ((sb * (SB * SB) + (tr % SB) * SB + tc % SB) * (TILE * TILE) + (r % TILE) * TILE + c % TILE)
    del tr, tc
    perm = torch.sort(key, dim=1).indices
    del key
    r_s, c_s = r.gather(1, perm), c.gather(1, perm)
    tile_list, tile_ptr, tile_slot, n_tiles = _group_rows((r_s // TILE) * ntc + c_s // TILE, nt)

    # sparse work items: each superblock's run cut into chunks of <= E_MAX entries
    pos = torch.arange(k, device=dev).expand(L, k)
    sb_s = sb.gather(1, perm)
    sb_start = torch.ones(L, k, dtype=torch.bool, device=dev)
    sb_start[:, 1:] = sb_s[:, 1:] != sb_s[:, :-1]
    first = torch.cummax(torch.where(sb_start, pos, 0), 1).values if k else pos
    item = torch.cumsum(sb_start | ((pos - first) % E_MAX == 0), 1) - 1
    n_items = item[:, -1] + 1 if k else torch.zeros(L, dtype=i64, device=dev)
    if k:
        def reduce(src, how):
            return torch.zeros(L, wmax, dtype=i64, device=dev).scatter_reduce_(1, item, src, how, include_self=False)
        e_end, e_begin = reduce(pos + 1, "amax"), reduce(pos, "amin")
        rmin, rmax, cmin, cmax = reduce(r_s, "amin"), reduce(r_s, "amax"), reduce(c_s, "amin"), reduce(c_s, "amax")
        valid = torch.arange(wmax, device=dev) < n_items[:, None]
        nrows = torch.where(valid, rmax - rmin + 1, 0)
        ncols = torch.where(valid, cmax - cmin + 1, 0)
        items = torch.stack([e_begin, e_end, rmin, nrows, cmin, ncols], 1)      # [L, 6, wmax]
        span_sum = (nrows + ncols).sum(1)
        # row-major order inside each item (same item ranges): a CUDA sparse warp step (32 consecutive positions
        # from the item start) then mostly shares a few grad_output rows (shared-memory broadcasts); its lanes
        # are dealt to quarter-warps against bank conflicts afterwards (balance_plans)
        sperm = perm.gather(1, torch.sort(item * (out_features * in_features) + idx.gather(1, perm), dim=1).indices)
    else:
        items = torch.zeros(L, 6, wmax, dtype=i64, device=dev)
        span_sum = torch.zeros(L, dtype=i64, device=dev)
        sperm = perm
    items = items.transpose(1, 2).reshape(L, -1)  # item-major: 6 ints per item
    rowlist, rowrank, n_r = _used_rows(r, out_features)
    collist, colrank, n_c = _used_rows(c, in_features)
    # kept until every group's counts are read back (one sync for all): the plan's int32, nothing per entry else
    i32 = torch.int32
    t = {"perm": perm.to(i32), "sperm": sperm.to(i32), "tile_list": tile_list.to(i32), "tile_ptr": tile_ptr.to(i32),
         "tile_slot": tile_slot.to(i32), "items": items.to(i32), "rowlist": rowlist.to(i32),
         "collist": collist.to(i32), "rowrank": rowrank.to(i32), "colrank": colrank.to(i32)}
    return t, torch.stack([n_tiles, n_items, n_r, n_c, span_sum], 1)


def _assemble(t, indices: List[torch.Tensor], counts: List[List[int]], out_features: int, in_features: int, k: int,
              triton, cuda, compaction: bool, T_hint: int) -> List[torch.Tensor]:
    """The plans of the L rows of :func:`_plan_rows`'s sections (``indices``: each row's index set), with the
    host-side decisions (compaction levels, strategy per backend) taken from each row's read-back ``counts``.
    Rows without compaction are cut from one [L, base] int32 block (a cat each); compacted rows add their compact
    sections one by one."""
    dev = t["perm"].device
    i64, i32 = torch.int64, torch.int32
    L = len(counts)
    nt = t["tile_slot"].shape[1]
    ntc = grid_dims(out_features, in_features)[1]
    wgmma = cuda_wgmma(dev)
    decisions, header = [], []
    for row, cnt in enumerate(counts):
        stats = {"n_tiles": cnt[0], "n_items": cnt[1], "nR": cnt[2], "nC": cnt[3], "span_sum": cnt[4]}
        lr, lc = choose_levels(out_features, in_features, stats["nR"], stats["nC"]) if compaction else (0, 0)
        # with compaction: a bound for the model (no second sync), the tiles of the used compact rectangle
        stats["n_ctiles"] = (min(_cdiv(max(stats["nR"], 1), TILE) * _cdiv(max(stats["nC"], 1), TILE), nt)
                             if lr or lc else stats["n_tiles"])
        choice = {be: forced or _pick(estimate_costs(T_hint, out_features, in_features, k, stats, be, lr, lc,
                                                     wgmma=be == "cuda" and wgmma))
                  for be, forced in (("triton", triton), ("cuda", cuda))}
        decisions.append((lr, lc, encode(lr, lc, choice["triton"], choice["cuda"])))
        h = [0] * HDR
        h[H_MAGIC], h[H_K], h[H_OUT], h[H_IN] = MAGIC, k, out_features, in_features
        h[H_NTILES], h[H_NITEMS], h[H_NR], h[H_NC], h[H_SPAN] = cnt[0], cnt[1], cnt[2], cnt[3], cnt[4]
        h[H_NCTILES] = cnt[0]  # compacted rows: their compact tile count, written on the device below
        h[H_LEVEL_R], h[H_LEVEL_C] = lr, lc
        header.append(h)
    headers = torch.tensor(header, dtype=i32)
    headers = headers.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else headers.to(dev)
    rows_ar = torch.arange(out_features, dtype=i32, device=dev).expand(L, out_features)
    cols_ar = torch.arange(in_features, dtype=i32, device=dev).expand(L, in_features)
    # the uncompacted layout of every row: compaction maps are identities, compact sections = the plain ones
    block = torch.cat([headers, t["perm"], t["sperm"], t["tile_list"], t["tile_ptr"], t["tile_slot"], t["items"],
                       rows_ar, cols_ar, rows_ar, cols_ar, t["perm"], t["tile_list"], t["tile_ptr"], t["tile_slot"]], 1)
    base = block.shape[1]
    assert base == base_len(k, out_features, in_features)
    pad = torch.zeros(N_CODES, dtype=i32, device=dev)
    plans = []
    for row, (lr, lc, code) in enumerate(decisions):
        if not (lr or lc):
            plans.append(torch.cat([block[row], pad[:code]]))
            continue
        rowlist = t["rowlist"][row] if lr else rows_ar[0]
        rowrank = t["rowrank"][row] if lr else rows_ar[0]
        collist = t["collist"][row] if lc else cols_ar[0]
        colrank = t["colrank"][row] if lc else cols_ar[0]
        idx = indices[row].reshape(-1).to(i64)
        r = torch.div(idx, in_features, rounding_mode="floor")
        cr, cc = rowrank.long()[r], colrank.long()[idx - r * in_features]
        ckey = ((cr // TILE) * ntc + cc // TILE) * (TILE * TILE) + (cr % TILE) * TILE + cc % TILE
        cperm = torch.sort(ckey).indices
        compact = _group_rows((ckey[cperm] // (TILE * TILE))[None], nt)
        head = headers[row].clone()
        head[H_NCTILES] = compact[3][0]
        parts = [head, t["perm"][row], t["sperm"][row], t["tile_list"][row], t["tile_ptr"][row], t["tile_slot"][row],
                 t["items"][row], rowlist, collist, rowrank, colrank, cperm.to(i32)] + [v[0].to(i32) for v in compact[:3]]
        plans.append(torch.cat(parts + [pad[:code]]))
    return plans


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
