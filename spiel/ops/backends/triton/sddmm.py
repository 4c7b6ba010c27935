"""Triton delta gradient (backend "triton"): result[j] = sum_t grad_output[t, r_j] * input[t, c_j], fp32.

Three strategies behind the one op (spiel/ops/backends/sddmm_plan.py explains them and the plan); the plan
built for the indices says which one to run (read from its length: no sync); ``strategy=`` overrides it:

    from spiel.ops.backends.triton.sddmm import sddmm
    sddmm(grad_output, input, indices, out, in, plan=None, strategy="sparse" | "dense_tile" | "dense_blas")

All of them read grad_output [T, out] and input [T, in] as they come (no transposes), write only the k
results, split T into a fixed number of parts when there is too little other parallelism and reduce the
partial sums in a fixed order (deterministic: bit-identical across runs on the same GPU).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._dispatch import register_kernel
from .. import sddmm_plan as P

# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _sparse_kernel(G, X, IDX, PERM, OUT, T, n_out, n_in, k, t_split,
                   BE: tl.constexpr, TB: tl.constexpr, DIRECT: tl.constexpr):
    """Program (b, s): entries perm[b*BE : (b+1)*BE] (tile-major order: a warp's 32 entries sit in one or
    two 128 x 128 tiles, so each token's loads touch few cache lines) over tokens [s*t_split, ...)."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    j = b * BE + tl.arange(0, BE)
    jm = j < k
    e = tl.load(PERM + j, mask=jm, other=0)
    idx = tl.load(IDX + e, mask=jm, other=0).to(tl.int64)
    r = idx // n_in
    c = idx - r * n_in
    t0 = s * t_split
    t1 = tl.minimum(T, t0 + t_split)
    acc = tl.zeros([TB, BE], dtype=tl.float32)
    for t in range(t0, t1, TB):
        tk = (t + tl.arange(0, TB)).to(tl.int64)
        m = (tk < t1)[:, None] & jm[None, :]
        g = tl.load(G + tk[:, None] * n_out + r[None, :], mask=m, other=0.0)
        x = tl.load(X + tk[:, None] * n_in + c[None, :], mask=m, other=0.0)
        acc += g.to(tl.float32) * x.to(tl.float32)
    res = tl.sum(acc, axis=0)
    if DIRECT:
        tl.store(OUT + e, res, mask=jm)
    else:
        tl.store(OUT + (tl.full((), 0, tl.int64) + s) * k + j, res, mask=jm)


@triton.jit
def _tile_kernel(A, B, IDX, PERM, TLIST, TPTR, CNT, RMAP, CMAP, OUT, SCR,
                 T, lda, ldb, nra, ncb, n_in, k, ntc, S, t_split,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
                 USE_RMAP: tl.constexpr, USE_CMAP: tl.constexpr, DIRECT: tl.constexpr,
                 GATHER: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Persistent: program p takes work items w = p, p + P, ... of (tile slot w // S, T split w % S) over the
    plan's non-empty tiles; C_tile = A[t, rows]^T @ B[t, cols] on tensor cores, then only the tile's
    requested entries are read back (tl.gather from the accumulator, or a per-program fp32 scratch tile)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_work = tl.load(CNT) * S
    for w in range(pid, n_work, nprog):
        slot = w // S
        s = w - slot * S
        tid = tl.load(TLIST + slot)
        tr = tid // ntc
        tc = tid - tr * ntc
        rows = tr * BM + tl.arange(0, BM)
        cols = tc * BN + tl.arange(0, BN)
        rmask = rows < nra
        cmask = cols < ncb
        t0 = s * t_split
        t1 = tl.minimum(T, t0 + t_split)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for t in range(t0, t1, BK):
            tk = (t + tl.arange(0, BK)).to(tl.int64)
            km = tk < t1
            a = tl.load(A + tk[:, None] * lda + rows[None, :], mask=km[:, None] & rmask[None, :], other=0.0)
            bb = tl.load(B + tk[:, None] * ldb + cols[None, :], mask=km[:, None] & cmask[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong (triton 3.8): multiply in fp32 there
                a = a.to(tl.float32)
                bb = bb.to(tl.float32)
            acc = tl.dot(tl.trans(a), bb, acc, input_precision=PREC)
        p0 = tl.load(TPTR + slot)
        p1 = tl.load(TPTR + slot + 1)
        if GATHER:
            flat = tl.reshape(acc, [BM * BN])
        else:
            scr = SCR + (tl.full((), 0, tl.int64) + pid) * (BM * BN)
            tl.store(scr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], acc)
            tl.debug_barrier()
        for jb in range(p0, p1, BE):
            j = jb + tl.arange(0, BE)
            jm = j < p1
            e = tl.load(PERM + j, mask=jm, other=0)
            idx = tl.load(IDX + e, mask=jm, other=0).to(tl.int64)
            r = idx // n_in
            c = idx - r * n_in
            if USE_RMAP:
                r = tl.load(RMAP + r, mask=jm, other=0).to(tl.int64)
            if USE_CMAP:
                c = tl.load(CMAP + c, mask=jm, other=0).to(tl.int64)
            loc = (r - tr * BM) * BN + (c - tc * BN)
            loc = tl.where(jm, loc, 0).to(tl.int32)
            if GATHER:
                v = tl.gather(flat, loc, 0)
            else:
                v = tl.load(scr + loc, mask=jm, other=0.0)
            if DIRECT:
                tl.store(OUT + e, v, mask=jm)
            else:
                tl.store(OUT + (tl.full((), 0, tl.int64) + s) * k + j, v, mask=jm)
        if not GATHER:
            tl.debug_barrier()


@triton.jit
def _reduce_kernel(PART, PERM, OUT, k, S, BLOCK: tl.constexpr):
    """out[perm[j]] = sum_{s < S} part[s, j], s in increasing order (fixed: deterministic)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    jm = j < k
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    off = j.to(tl.int64)
    for s in range(0, S):
        acc += tl.load(PART + off, mask=jm, other=0.0)
        off += k
    e = tl.load(PERM + j, mask=jm, other=0)
    tl.store(OUT + e, acc, mask=jm)


@triton.jit
def _band_gather_kernel(BAND, IDX, RMAP, CMAP, OUT, k, n_in, r0, R, c0, C,
                        USE_RMAP: tl.constexpr, USE_CMAP: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = band[r_j - r0, c_j - c0] for the entries whose (compact) row and column lie in the band
    [r0, r0 + R) x [c0, c0 + C) (a contiguous [R, C] block)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    jm = j < k
    idx = tl.load(IDX + j, mask=jm, other=0).to(tl.int64)
    r = idx // n_in
    c = idx - r * n_in
    if USE_RMAP:
        r = tl.load(RMAP + r, mask=jm, other=0).to(tl.int64)
    if USE_CMAP:
        c = tl.load(CMAP + c, mask=jm, other=0).to(tl.int64)
    inb = jm & (r >= r0) & (r < r0 + R) & (c >= c0) & (c < c0 + C)
    v = tl.load(BAND + (r - r0) * C + (c - c0), mask=inb, other=0.0)
    tl.store(OUT + j, v, mask=inb)


# ---------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------
SPARSE_BE = 128      # entries per sparse program
SPARSE_TB = 16       # tokens per sparse inner step
TILE_BK = 64
TILE_BE = 128        # entries read back per step of the tile epilogue
MIN_TOKENS_PER_SPLIT = 256

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NSM = {}
_GATHER_OK = {"value": os.environ.get("SPIEL_SDDMM_TILE_EXTRACT", "gather") != "scratch"}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _NSM:
        _NSM[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _NSM[key]


def _splits(T: int, work_units: int, target: int) -> int:
    """How many T splits give about ``target`` programs (fixed by shapes: deterministic)."""
    if work_units <= 0:
        return 1
    s = max(1, -(-target // work_units))
    return max(1, min(s, T // MIN_TOKENS_PER_SPLIT if T >= MIN_TOKENS_PER_SPLIT else 1, 64))


def _t_split(T: int, S: int, align: int) -> int:
    per = -(-T // S)
    return max(align, -(-per // align) * align)


def _finish(part, perm, out, k, S):
    grid = (triton.cdiv(k, 1024),)
    _reduce_kernel[grid](part, perm, out, k, S, BLOCK=1024)
    return out


def _sparse(G, X, idx, secs, out_f, in_f, k):
    T = G.shape[0]
    nsm = _num_sms(G.device)
    nb = triton.cdiv(k, SPARSE_BE)
    S = _splits(T, nb, 8 * nsm)
    ts = _t_split(T, S, SPARSE_TB)
    S = triton.cdiv(T, ts)
    out = torch.empty(k, dtype=torch.float32, device=G.device)
    perm = secs["perm"]
    if S == 1:
        _sparse_kernel[(nb, 1)](G, X, idx, perm, out, T, out_f, in_f, k, ts, BE=SPARSE_BE, TB=SPARSE_TB,
                                DIRECT=True, num_warps=4)
        return out
    part = torch.empty(S * k, dtype=torch.float32, device=G.device)
    _sparse_kernel[(nb, S)](G, X, idx, perm, part, T, out_f, in_f, k, ts, BE=SPARSE_BE, TB=SPARSE_TB,
                            DIRECT=False, num_warps=4)
    return _finish(part, perm, out, k, S)


def _operands(G, X, secs, out_f, in_f, info):
    """(A, B, use_rmap, use_cmap): the operands the dense strategies multiply (compacted per the plan)."""
    lr, lc = info["level_r"], info["level_c"]
    A, B = G, X
    if lr:
        A = G.index_select(1, secs["rowlist"][:P.cap(out_f, lr)])
    if lc:
        B = X.index_select(1, secs["collist"][:P.cap(in_f, lc)])
    return A, B, bool(lr), bool(lc)


def _dense_tile(G, X, idx, secs, out_f, in_f, k, info):
    T = G.shape[0]
    A, B, ur, uc = _operands(G, X, secs, out_f, in_f, info)
    compact = ur or uc
    ntr, ntc = P.grid_dims(out_f, in_f)
    nt_bound = P.grid_dims(A.shape[1], B.shape[1])
    nt_bound = nt_bound[0] * nt_bound[1] if compact else ntr * ntc
    nsm = _num_sms(G.device)
    S = _splits(T, nt_bound, nsm)
    ts = _t_split(T, S, TILE_BK)
    S = triton.cdiv(T, ts)
    hdr = secs["header"]
    if compact:
        perm, tlist, tptr, cnt = secs["cperm"], secs["ctile_list"], secs["ctile_ptr"], hdr[P.H_NCTILES:]
    else:
        perm, tlist, tptr, cnt = secs["perm"], secs["tile_list"], secs["tile_ptr"], hdr[P.H_NTILES:]
    out = torch.empty(k, dtype=torch.float32, device=G.device)
    dst = out if S == 1 else torch.empty(S * k, dtype=torch.float32, device=G.device)
    nprog = max(1, min(nt_bound * S, nsm))
    prec = "ieee" if (G.dtype == torch.float32 or _INTERPRET) else "tf32"

    def launch(gather: bool):
        scr = out if gather else torch.empty(nprog * P.TILE * P.TILE, dtype=torch.float32, device=G.device)
        _tile_kernel[(nprog,)](A, B, idx, perm, tlist, tptr, cnt, secs["rowmap"], secs["colmap"], dst, scr,
                               T, A.shape[1], B.shape[1], A.shape[1], B.shape[1], in_f, k, ntc, S, ts,
                               BM=P.TILE, BN=P.TILE, BK=TILE_BK, BE=TILE_BE, USE_RMAP=ur, USE_CMAP=uc,
                               DIRECT=(S == 1), GATHER=gather, PREC=prec, UPCAST=_INTERPRET, num_warps=8,
                               num_stages=3)

    if _GATHER_OK["value"]:
        try:
            launch(True)
        except Exception:  # a Triton without tl.gather lowering for this layout: use the scratch epilogue
            _GATHER_OK["value"] = False
            launch(False)
    else:
        launch(False)
    if S == 1:
        return out
    return _finish(dst, perm, out, k, S)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output and fp32 accumulation (cuBLAS bf16/fp16 -> fp32; fp32 without TF32)."""
    if a.dtype == torch.float32:
        if a.is_cuda:
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                return torch.mm(a, b)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _dense_blas(G, X, idx, secs, out_f, in_f, k, info):
    A, B, ur, uc = _operands(G, X, secs, out_f, in_f, info)
    rows, cols = A.shape[1], B.shape[1]
    out = torch.empty(k, dtype=torch.float32, device=G.device)
    grid = (triton.cdiv(k, 1024),)
    for r0, rr, c0, cc in P.bands(rows, cols):
        band = _mm_fp32(A[:, r0:r0 + rr].t(), B[:, c0:c0 + cc])
        _band_gather_kernel[grid](band, idx, secs["rowmap"], secs["colmap"], out, k, in_f, r0, rr, c0, cc,
                                  USE_RMAP=ur, USE_CMAP=uc, BLOCK=1024)
    return out


_IMPL = {"sparse": _sparse, "dense_tile": _dense_tile, "dense_blas": _dense_blas}


def sddmm(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, out_features: int,
          in_features: int, plan: Optional[torch.Tensor] = None, strategy: Optional[str] = None) -> torch.Tensor:
    """fp32 [k]: (grad_output^T @ input) at flat ``indices``. Arguments as the op's kernel contract
    (2-D contiguous, validated); ``plan`` from ``sddmm_plan``: without one, dense_blas runs (or, when another
    ``strategy`` is forced, a plan is built here with one sync); ``strategy`` in
    ``"sparse" | "dense_tile" | "dense_blas"`` overrides the plan's choice."""
    k = indices.numel()
    T = grad_output.shape[0]
    out_features, in_features = int(out_features), int(in_features)
    if P.is_row_plan(plan, out_features):  # for the CUDA wgmma kernel only: here the same as no plan
        plan = None
    if k == 0:
        return torch.empty(0, dtype=torch.float32, device=grad_output.device)
    if T == 0:
        return torch.zeros(k, dtype=torch.float32, device=grad_output.device)
    if plan is None and strategy in (None, "dense_blas"):
        # no plan: the vendor GEMM over row bands, uncompacted (as the CUDA backend; no plan build, no sync)
        info = {"level_r": 0, "level_c": 0, "triton": "dense_blas", "cuda": "dense_blas"}
        secs = {"rowmap": indices, "colmap": indices}  # never read without compaction
        return _dense_blas(grad_output.contiguous(), input.contiguous(), indices.contiguous(), secs, out_features,
                           in_features, k, info)
    if plan is None:
        plan = P.build_plan(indices, out_features, in_features)
    info = P.plan_code(plan, k, out_features, in_features)
    strategy = strategy or info["triton"]
    if strategy not in _IMPL:
        raise ValueError(f"strategy must be one of {tuple(_IMPL)}, got {strategy!r}")
    secs = P.sections(plan, k, out_features, in_features)
    G = grad_output.contiguous()
    X = input.contiguous()
    idx = indices.contiguous()
    if strategy == "sparse":
        return _sparse(G, X, idx, secs, out_features, in_features, k)
    return _IMPL[strategy](G, X, idx, secs, out_features, in_features, k, info)


@register_kernel("sddmm", "triton")
def _sddmm_kernel(grad_output, input, indices, out_features, in_features, plan):
    return sddmm(grad_output, input, indices, out_features, in_features, plan)
