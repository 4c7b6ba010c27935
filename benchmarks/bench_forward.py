"""Forward kernels: delta merge and fused NF4-dequantize-plus-delta, spiel (Triton, CUDA) against the baselines.

    python benchmarks/bench_forward.py                  # full table (< 2 min on an H100)
    python benchmarks/bench_forward.py --quick          # 11008x4096 only
    python benchmarks/bench_forward.py --tune           # also sweep the Triton launch configs (+ ~40 s)
    python benchmarks/bench_forward.py --device cpu     # CPU smoke run (reference/torch providers only)

Shapes 4096x4096, 11008x4096, 4096x11008, 14336x4096 (bf16); densities 0.1 %, 1 %, 3 % (int32 indices,
fp32 values, never zero). Providers:

- merge: ``torch clone+scatter_add_`` (baseline: ``w.clone().view(-1).scatter_add_(0, idx64, v_bf16)``),
  spiel triton / cuda ``merge_delta`` into a separate output, and triton in place (``out is weight``: only
  the k delta positions are touched);
- NF4 (blocksize 64, fp32 absmax, bf16 output): bitsandbytes ``dequantize_4bit`` + ``scatter_add_``
  (baseline, if bitsandbytes imports), spiel triton / cuda ``nf4_dequantize_add_delta``; same data
  (spiel's quantized weight handed to bitsandbytes through ``NF4Weight.to_bnb``).

Timing: the harness (``triton.testing.do_bench`` median, L2 flushed between calls) with every provider's
inputs and outputs rotated over several buffer sets (>= 200 MB per rotation, so L2 does not flatter).
Columns: ms, GB/s = the bytes the op must move (merge: 2 B read + 2 B written per bf16 weight + k * 8;
NF4: n/2 + absmax n/64 * 4 + 2 B written per weight + k * 8) / time, % of the copy ceiling measured in the
same run (``x.copy_(y)`` on 512 MiB, read + written bytes), and the ratio to the baseline (x faster).
Each spiel output is checked bit-exact against the reference backend before timing (``mismatch`` note).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from harness import Runner, Skip, common_args, guarded_main, pick_device, print_header, print_table  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
DENSITIES = (0.001, 0.01, 0.03)
ROTATE_BYTES = 200e6
NF4_BLOCKSIZE = 64


def parse_args(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="outxin,outxin,...")
    p.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    p.add_argument("--quick", action="store_true", help="11008x4096 only")
    p.add_argument("--tune", action="store_true", help="also sweep the Triton kernels' launch configurations")
    p.add_argument("--rep-ms", type=float, default=60)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = "11008x4096"
    return args


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def _indices(n, k, device, g):
    from providers import random_indices

    return random_indices(n, k, device, dtype=torch.int32, generator=g)


def _values(k, device, g):
    v = torch.randn(k, device=device, generator=g)
    return torch.where(v == 0, torch.ones_like(v), v)


def _rotation(bytes_per_call: float) -> int:
    return max(2, math.ceil(ROTATE_BYTES / max(bytes_per_call, 1)))


def _cycler(items):
    state = {"i": 0}

    def nxt():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


def _require(backend, device):
    from spiel.ops import backend_info

    info = backend_info()[backend]
    if not info["available"]:
        raise Skip(f"{backend} backend unavailable: {info['reason']}")
    if backend == "cuda" and device.type != "cuda":
        raise Skip("the cuda backend needs CUDA tensors")


def merge_bytes(n, k, elem=2):
    return 2 * elem * n + 8 * k


def nf4_bytes(n, k, blocksize=NF4_BLOCKSIZE):
    return n // 2 + 4 * math.ceil(n / blocksize) + 2 * n + 8 * k


class MergeCase:
    def __init__(self, shape, density, device):
        self.shape, self.device = shape, device
        self.n = shape[0] * shape[1]
        self.k = int(round(self.n * density))
        g = torch.Generator(device=device).manual_seed(hash((shape, density)) % 2**31)
        self.sets = []
        for _ in range(_rotation(merge_bytes(self.n, self.k))):
            w = torch.randn(shape, device=device, generator=g).to(torch.bfloat16)
            idx = _indices(self.n, self.k, device, g)
            val = _values(self.k, device, g)
            self.sets.append((w, idx, val))

    def check(self, fn) -> str:
        from spiel.ops._dispatch import kernel_for

        w, idx, val = self.sets[0]
        want = torch.full_like(w, float("nan"))
        kernel_for("merge_delta", "torch")(w, idx, val, want)
        got = torch.full_like(w, float("nan"))
        fn(w, idx, val, got)
        return "" if torch.equal(got, want) else "MISMATCH vs reference"

    def baseline(self):
        sets = [(w, idx.long(), val.to(w.dtype)) for w, idx, val in self.sets]
        nxt = _cycler(sets)

        def step():
            w, idx, val = nxt()
            out = w.clone()
            out.view(-1).scatter_add_(0, idx, val)
            return out

        return step

    def spiel(self, backend, inplace=False):
        from spiel.ops._dispatch import kernel_for

        _require(backend, self.device)
        fn = kernel_for("merge_delta", backend)
        if fn is None:
            raise Skip(f"{backend} has no merge_delta")
        note = self.check(fn)
        if inplace:
            sets = [(w.clone(), idx, val) for w, idx, val in self.sets]
            nxt = _cycler(sets)

            def step():
                w, idx, val = nxt()
                fn(w, idx, val, w)
        else:
            sets = [(w, idx, val, torch.empty_like(w)) for w, idx, val in self.sets]
            nxt = _cycler(sets)

            def step():
                w, idx, val, out = nxt()
                fn(w, idx, val, out)

        return step, note


class NF4Case:
    def __init__(self, shape, density, device):
        from spiel.ops import backend_info, nf4_quantize, use_backend

        self.shape, self.device = shape, device
        self.n = shape[0] * shape[1]
        self.k = int(round(self.n * density))
        g = torch.Generator(device=device).manual_seed(hash(("nf4", shape, density)) % 2**31)
        backend = "triton" if device.type == "cuda" and backend_info()["triton"]["available"] else "torch"
        self.sets = []
        for _ in range(_rotation(nf4_bytes(self.n, self.k))):
            w = torch.randn(shape, device=device, generator=g).to(torch.bfloat16)
            with use_backend(backend):
                nf4 = nf4_quantize(w, NF4_BLOCKSIZE)
            del w
            idx = _indices(self.n, self.k, device, g)
            val = _values(self.k, device, g)
            self.sets.append((nf4, idx, val))

    def check(self, fn) -> str:
        from spiel.ops._dispatch import kernel_for

        nf4, idx, val = self.sets[0]
        args = nf4.op_args()[:6]
        want = torch.full(self.shape, float("nan"), dtype=torch.bfloat16, device=self.device)
        kernel_for("nf4_dequantize_add_delta", "torch")(*args, idx, val, want)
        got = torch.full_like(want, float("nan"))
        fn(*args, idx, val, got)
        return "" if torch.equal(got, want) else "MISMATCH vs reference"

    def baseline(self):
        try:
            import bitsandbytes.functional as bnbf
        except Exception as exc:
            raise Skip(f"bitsandbytes does not import: {type(exc).__name__}")
        sets = []
        for nf4, idx, val in self.sets:
            packed, state = nf4.to_bnb()
            sets.append((packed, state, idx.long(), val.to(torch.bfloat16)))
        nxt = _cycler(sets)

        def step():
            packed, state, idx, val = nxt()
            out = bnbf.dequantize_4bit(packed, state)
            out.view(-1).scatter_add_(0, idx, val)
            return out

        return step

    def spiel(self, backend):
        from spiel.ops._dispatch import kernel_for

        _require(backend, self.device)
        fn = kernel_for("nf4_dequantize_add_delta", backend)
        if fn is None:
            raise Skip(f"{backend} has no nf4_dequantize_add_delta")
        note = self.check(fn)
        sets = [(nf4.op_args()[:6], idx, val, torch.empty(self.shape, dtype=torch.bfloat16, device=self.device))
                for nf4, idx, val in self.sets]
        nxt = _cycler(sets)

        def step():
            args, idx, val, out = nxt()
            fn(*args, idx, val, out)

        return step, note


# ---------------------------------------------------------------------------------------------------------
# tuning sweep (Triton launch configs)
# ---------------------------------------------------------------------------------------------------------
def tune(runner: Runner, device, shape=(11008, 4096)):
    from spiel.ops.backends.triton import merge as tmerge, nf4 as tnf4
    from harness import time_fn

    rows = []
    copy = runner.ceil.get("copy_tbps", float("nan"))
    for density in (0.0, 0.01, 0.03):
        mc = MergeCase(shape, density, device)
        nc = NF4Case(shape, density, device)
        for kind, case, cfgs, module, nbytes in (
                ("merge bf16", mc, [(4096, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 8), (16384, 16)],
                 tmerge, merge_bytes(mc.n, mc.k)),
                ("nf4 bf16", nc, [(4096, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 8), (16384, 16)],
                 tnf4, nf4_bytes(nc.n, nc.k))):
            for block, warps in cfgs:
                module._CONFIG_OVERRIDE.update(block=block, num_warps=warps)
                try:
                    step, note = case.spiel("triton")
                    step()
                    ms = time_fn(step, device, 10, 40)["ms"]
                except Exception as exc:  # a config that does not compile is reported, not fatal
                    ms, note = float("nan"), f"failed: {type(exc).__name__}"
                finally:
                    module._CONFIG_OVERRIDE.clear()
                tbps = nbytes / (ms * 1e-3) / 1e12
                rows.append({"kernel": kind, "density": density, "block": block, "warps": warps, "ms": ms,
                             "tbps": tbps, "pct": 100 * tbps / copy, "note": note})
        del mc, nc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, [("kernel", "kernel"), ("density", "density"), ("BLOCK", "block"), ("warps", "warps"),
                       ("ms", "ms"), ("TB/s", "tbps"), ("% copy", "pct"), ("note", "note")],
                title=f"Triton config sweep, {shape[0]}x{shape[1]} (defaults: merge {tmerge.MERGE_CONFIG[2]}, "
                      f"nf4 {tnf4.DEQUANT_CONFIG[2]})")


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    import spiel.ops  # noqa: F401  (registers the backends)

    def body(runner: Runner):
        print_header("forward", device, runner.ceil)
        for shape in shapes:
            for density in densities:
                case = f"{shape[0]}x{shape[1]}@{density:g}"
                info = {"shape": f"{shape[0]}x{shape[1]}", "density": density}
                mc = MergeCase(shape, density, device)
                info["k"] = mc.k
                extra = {"kind": "merge", "bytes": merge_bytes(mc.n, mc.k)}
                ref = runner.run(case, "merge: torch clone+scatter_add_", mc.baseline,
                                 dict(info, extra=extra), reference=True)
                ref_ms = ref.get("ms") or None
                for name, factory in (("merge: spiel triton", lambda: mc.spiel("triton")),
                                      ("merge: spiel cuda", lambda: mc.spiel("cuda")),
                                      ("merge: spiel triton in place", lambda: mc.spiel("triton", True)),
                                      ("merge: spiel cuda in place", lambda: mc.spiel("cuda", True))):
                    runner.run(case, name, factory, dict(info, extra=extra), ref_ms=ref_ms)
                mc = None  # free before the NF4 inputs
                nc = NF4Case(shape, density, device)
                extra = {"kind": "nf4", "bytes": nf4_bytes(nc.n, nc.k)}
                ref = runner.run(case, "nf4: bnb dequantize_4bit+scatter_add_", nc.baseline,
                                 dict(info, extra=extra), reference=True)
                ref_ms = ref.get("ms") or None
                for name, factory in (("nf4: spiel triton", lambda: nc.spiel("triton")),
                                      ("nf4: spiel cuda", lambda: nc.spiel("cuda"))):
                    runner.run(case, name, factory, dict(info, extra=extra), ref_ms=ref_ms)
                nc = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if args.tune and device.type == "cuda":
            tune(runner, device)

    def report(runner: Runner):
        copy = runner.ceil.get("copy_tbps", float("nan"))

        def gbs(r):
            ms, extra = r.get("ms"), r.get("extra") or {}
            if not ms or not isinstance(extra, dict):
                return None
            if "in place" in str(r.get("provider")):
                return None  # moves 4 B x k + k * 8, not the dense bytes
            return extra["bytes"] / (float(ms) * 1e-3) / 1e9

        def pct(r):
            v = gbs(r)
            return None if v is None else 100 * v / (copy * 1e3)

        def speedup(r):
            x = r.get("x_ref")
            return None if not x else 1 / float(x)

        print_table(runner.rows, [("case", "case"), ("provider", "provider"), ("ms", "ms"), ("GB/s", gbs),
                                  ("% copy", pct), ("x faster than baseline", speedup), ("note", "note")],
                    title=f"forward kernels (copy ceiling {copy:.2f} TB/s measured in this run)")
        print("\ntargets (11008x4096 @ 1%): bf16 merge >= 85% of copy; NF4 fused >= 80% of copy and >= 2.2x "
              "bitsandbytes dequantize_4bit + scatter_add_", flush=True)

    return guarded_main(lambda: Runner("forward", device, args.csv, warmup_ms=10, rep_ms=args.rep_ms,
                                       measure_memory=False), body, report)


if __name__ == "__main__":
    sys.exit(main())
