"""Drive every CUDA forward kernel of csrc/merge.cu at small shapes (for compute-sanitizer), or time them.

    python tests/gpu/sanitize_driver.py             # every template instantiation once, small + odd shapes
    compute-sanitizer --tool memcheck python tests/gpu/sanitize_driver.py   # see benchmarks/gpu_sanitize.sh
    python tests/gpu/sanitize_driver.py --bench     # 11008 x 4096 at 1%: merge, NF4 dequant+delta, quantize

The check mode compares each result with a torch computation (bit-exact) and exits 1 on any mismatch, so a
sanitizer run also proves the kernels still compute the right thing. It imports only torch and spiel._C
(plus bitsandbytes / triton in --bench, when installed).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

DEV = "cuda"
FLOATS = [torch.bfloat16, torch.float16, torch.float32]
INDEXES = [torch.int32, torch.int64]
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982355384827, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
FAILURES = []


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    same = (got == want) | (got.isnan() & want.isnan()) if got.is_floating_point() else got == want
    if got.shape != want.shape or not bool(same.all()):
        FAILURES.append(name)
        print(f"MISMATCH {name}", flush=True)


def indices(n: int, k: int, dtype) -> torch.Tensor:
    return torch.randperm(n, device=DEV)[:k].sort().values.to(dtype)


def merge_want(w, idx, val):
    fp32 = w.float().reshape(-1).clone()
    fp32[idx.long()] += val.float()
    want = w.reshape(-1).clone()
    want[idx.long()] = fp32[idx.long()].to(w.dtype)
    return want


def nf4_want(packed, absmax, nabs, ncode, noff, bs, idx, val, dtype):
    n = packed.numel() * 2
    if absmax.dtype == torch.uint8:
        absmax = ncode[absmax.long()] * nabs.repeat_interleave(256)[: absmax.numel()] + torch.tensor(
            noff, dtype=torch.float32, device=DEV)
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1).long()
    dense = torch.tensor(NF4_CODE, device=DEV)[codes] * absmax.repeat_interleave(bs)[:n]
    dense[idx.long()] += val.float()
    return dense.to(dtype)


def nf4_args(n, bs, nested):
    nblocks = (n + bs - 1) // bs
    packed = torch.randint(0, 256, (n // 2,), device=DEV, dtype=torch.uint8)
    if nested:
        return (packed, torch.randint(0, 256, (nblocks,), device=DEV, dtype=torch.uint8),
                torch.rand((nblocks + 255) // 256, device=DEV) + 0.5, torch.randn(256, device=DEV).sort().values,
                0.3)
    return packed, torch.rand(nblocks, device=DEV) + 0.1, None, None, 0.0


def run_checks() -> int:
    ops = torch.ops.spiel
    torch.manual_seed(0)
    # merge: every (weight, values, index) dtype; a partial chunk, several chunks, in place, misaligned
    for wd, vd, idd in itertools.product(FLOATS, FLOATS, INDEXES):
        for shape, k in (((3, 5), 4), ((37, 129), 500), ((67, 300), 2000), ((1, 1), 1), ((5, 7), 0)):
            n = shape[0] * shape[1]
            w = torch.randn(shape, device=DEV).to(wd)
            idx = indices(n, k, idd)
            val = torch.randn(k, device=DEV).to(vd)
            out = torch.full(shape, float("nan"), dtype=wd, device=DEV)
            ops._cuda_merge_delta(w, idx, val, out)
            check(f"merge {wd} {vd} {idd} {shape} k={k}", out.view(-1), merge_want(w, idx, val))
            before = w.clone()
            ops._cuda_merge_delta(w, idx, val, w)
            check(f"merge in-place {wd} {vd} {idd} {shape}", w.view(-1), merge_want(before, idx, val))
        buf = torch.randn(37 * 129 + 1, device=DEV).to(wd)
        obuf = torch.full_like(buf, float("nan"))
        idx = indices(37 * 129, 300, idd)
        val = torch.randn(300, device=DEV).to(vd)
        ops._cuda_merge_delta(buf[1:], idx, val, obuf[1:])
        check(f"merge misaligned {wd} {vd} {idd}", obuf[1:], merge_want(buf[1:], idx, val))
    # NF4 dequant + delta: every (out, values, index, absmax kind); every blocksize; partial chunk; misaligned
    for od, vd, idd, nested in itertools.product(FLOATS, FLOATS, INDEXES, (False, True)):
        for n, k in ((2, 1), (30, 0), (4810, 300), (8192 * 2 + 4098, 3000)):
            args = nf4_args(n, 64, nested)
            idx = indices(n, k, idd)
            val = torch.randn(k, device=DEV).to(vd)
            out = torch.full((n,), float("nan"), dtype=od, device=DEV)
            ops._cuda_nf4_dequantize_add_delta(*args, 64, idx, val, out)
            check(f"nf4 {od} {vd} {idd} nested={nested} n={n} k={k}", out, nf4_want(*args, 64, idx, val, od))
    for bs, nested in itertools.product([32, 64, 128, 256, 512, 1024, 2048, 4096], (False, True)):
        n = 8192 + 4096 + 66
        args = nf4_args(n, bs, nested)
        idx = indices(n, 200, torch.int32)
        val = torch.randn(200, device=DEV)
        out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEV)
        ops._cuda_nf4_dequantize_add_delta(*args, bs, idx, val, out)
        check(f"nf4 bs={bs} nested={nested}", out, nf4_want(*args, bs, idx, val, torch.bfloat16))
    n = 4810
    packed, absmax, _, _, _ = nf4_args(n, 32, False)
    pbuf = torch.empty(n // 2 + 1, dtype=torch.uint8, device=DEV)
    pbuf[1:] = packed
    obuf = torch.full((n + 1,), float("nan"), dtype=torch.float16, device=DEV)
    idx = indices(n, 50, torch.int64)
    val = torch.randn(50, device=DEV)
    ops._cuda_nf4_dequantize_add_delta(pbuf[1:], absmax, None, None, 0.0, 32, idx, val, obuf[1:])
    check("nf4 misaligned", obuf[1:], nf4_want(packed, absmax, None, None, 0.0, 32, idx, val, torch.float16))
    # quantize: every dtype and blocksize; partial last block; misaligned (compared through dequantize)
    empty = torch.empty(0, dtype=torch.int32, device=DEV)
    for wd, bs in itertools.product(FLOATS, [32, 64, 128, 256, 512, 1024, 2048, 4096]):
        for n in (2, 4810, 4096 * 3 + 130):
            w = torch.randn(n + 1, device=DEV).to(wd)[1:] if bs == 128 else torch.randn(n, device=DEV).to(wd)
            packed, absmax = ops._cuda_nf4_quantize(w, bs)
            nblocks = (n + bs - 1) // bs
            pad = torch.nn.functional.pad(w.float().abs(), (0, nblocks * bs - n))
            check(f"quant absmax {wd} bs={bs} n={n}", absmax, pad.view(nblocks, bs).amax(1))
            inv = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(bs)[:n]
            code = torch.tensor(NF4_CODE, device=DEV)
            q = torch.bucketize(torch.clamp(w.float() * inv, -1, 1), (code[:-1] + code[1:]) / 2).to(torch.uint8)
            check(f"quant packed {wd} bs={bs} n={n}", packed, (q[0::2] << 4) | q[1::2])
            out = torch.empty(n, dtype=torch.float32, device=DEV)
            ops._cuda_nf4_dequantize_add_delta(packed, absmax, None, None, 0.0, bs, empty, empty.float(), out)
    # index_put_many_ / index_select_many: 2-, 4- and 8-byte dtypes, both index dtypes, > 64 tensors (two
    # launches), empty and one-element entries, out-of-range indices (skipped: never a stray access)
    for dt, idd in itertools.product(FLOATS + [torch.float64], INDEXES):
        shapes = [(3, 5), (37, 129), (1, 1), (5, 7)] * 17 + [(67, 300)]
        dense = [torch.randn(s, device=DEV).to(dt) for s in shapes]
        ks = [min(s[0] * s[1], (7 * j) % 400) for j, s in enumerate(shapes)]
        idxs = [torch.randperm(s[0] * s[1], device=DEV)[:k].to(idd) for s, k in zip(shapes, ks)]
        vals = [torch.randn(k, device=DEV).to(dt) for k in ks]
        want = [d.clone() for d in dense]
        for w, i, v in zip(want, idxs, vals):
            w.view(-1)[i.long()] = v
        ops._cuda_index_put_many_(dense, idxs, vals)
        for j, (d, w) in enumerate(zip(dense, want)):
            check(f"index_put_many {dt} {idd} [{j}]", d.view(-1), w.view(-1))
        outs = [torch.full((k,), float("nan"), device=DEV).to(dt) for k in ks]
        ops._cuda_index_select_many(dense, idxs, outs)
        for j, (d, i, o) in enumerate(zip(dense, idxs, outs)):
            check(f"index_select_many {dt} {idd} [{j}]", o, d.view(-1)[i.long()])
        bad = [torch.tensor([-1, 15, 2], device=DEV, dtype=idd)]
        before = dense[0].clone()
        ops._cuda_index_put_many_([dense[0]], bad, [torch.ones(3, device=DEV).to(dt)])
        expect = before.view(-1).clone()
        expect[2] = 1
        check(f"index_put_many out of range {dt} {idd}", dense[0].view(-1), expect)
    torch.cuda.synchronize()
    print(f"sanitize_driver: {len(FAILURES)} mismatches", flush=True)
    return 1 if FAILURES else 0


def bench() -> None:
    from triton.testing import do_bench

    ops = torch.ops.spiel
    torch.manual_seed(0)
    rows, cols = 11008, 4096
    n = rows * cols
    k = n // 100
    idx = indices(n, k, torch.int32)
    val = torch.randn(k, device=DEV)
    w = torch.randn(rows, cols, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(w)

    def report(name, ms, nbytes, copy_tbps=None):
        tbps = nbytes / (ms * 1e-3) / 1e12
        pct = f"  {100 * tbps / copy_tbps:5.1f}% of copy" if copy_tbps else ""
        print(f"{name:55s} {ms * 1e3:8.1f} us  {tbps:5.2f} TB/s{pct}", flush=True)
        return tbps

    copy = report("torch copy bf16 (out.copy_(w))", do_bench(lambda: out.copy_(w)), 4 * n)
    report("merge bf16 out-of-place, 1%, int32/fp32", do_bench(lambda: ops._cuda_merge_delta(w, idx, val, out)),
           4 * n + 8 * k, copy)
    report("merge bf16 in place, 1%", do_bench(lambda: ops._cuda_merge_delta(out, idx, val, out)), 4 * n + 8 * k, copy)
    for nested in (False, True):
        args = nf4_args(n, 64, nested)
        absmax_bytes = (n // 64) * (1 if nested else 4)
        ms = do_bench(lambda: ops._cuda_nf4_dequantize_add_delta(*args, 64, idx, val, out))
        report(f"nf4 dequant+delta -> bf16, bs 64, double_quant={nested}", ms, n // 2 + absmax_bytes + 2 * n + 8 * k,
               copy)
        report(f"nf4 dequant (k=0) -> bf16, bs 64, double_quant={nested}",
               do_bench(lambda: ops._cuda_nf4_dequantize_add_delta(*args, 64, idx[:0], val[:0], out)),
               n // 2 + absmax_bytes + 2 * n, copy)
    report("nf4 quantize bf16, bs 64", do_bench(lambda: ops._cuda_nf4_quantize(w, 64)), 2 * n + n // 2 + n // 16, copy)
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # optional
        print(f"bitsandbytes not available ({exc}): no baseline", flush=True)
        return
    for nested in (False, True):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        flat_idx = idx.long()

        def bnb_step():
            dense = bnbf.dequantize_4bit(packed, state)
            dense.view(-1).scatter_add_(0, flat_idx, val.to(dense.dtype))
            return dense

        ms_bnb = do_bench(bnb_step)
        print(f"bitsandbytes dequantize_4bit + scatter_add_ (double_quant={nested}): {ms_bnb * 1e3:.1f} us",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time the kernels at 11008 x 4096, 1%% density")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import spiel._C  # noqa: F401

    if args.bench:
        bench()
        return 0
    return run_checks()


if __name__ == "__main__":
    sys.exit(main())
