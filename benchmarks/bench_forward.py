"""Forward kernels: delta merge and fused NF4-dequantize-plus-delta, spiel (Triton, CUDA) against the baselines.

    python benchmarks/bench_forward.py                  # full table (< 2 min on an H100)
    python benchmarks/bench_forward.py --quick          # 11008x4096 only
    python benchmarks/bench_forward.py --tune --tune-out tune.json   # ONLY the Triton knob sweep (< 90 s)
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

``--tune`` replaces the table by a sweep of the Triton kernels' launch knobs (``MERGE_CONFIG`` in
spiel/ops/backends/triton/merge.py, ``DEQUANT_CONFIG`` in nf4.py): bf16 merge (int32 indices, fp32 values)
and NF4 (blocksize 64, double quant, bf16 out) on 11008x4096 and 4096x4096 at 1 %. Every variant is compiled
first in a pool of worker processes (Triton's disk cache then serves the timing loop), checked once for exact
equality with the reference, then timed on both shapes (do_bench median); "% copy" is against
``torch.empty_like(x).copy_(x)`` on a tensor of the same total bytes, timed in the same run, and "x base" is
the speed-up over the baseline (clone + scatter_add_ / bitsandbytes dequantize_4bit + scatter_add_) of the
same run. Variants are timed in priority order within ``TUNE_BUDGET_S``. Prints the best knobs per kernel
and shape as the table entries to paste, and writes everything as JSON to ``--tune-out``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from harness import (Runner, Skip, clip, common_args, fmt, guarded_main, pick_device, print_header,  # noqa: E402
                     print_table)

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
DENSITIES = (0.001, 0.01, 0.03)
TUNE_SHAPES = ((11008, 4096), (4096, 4096))
TUNE_DENSITY = 0.01
TUNE_BUDGET_S = 75  # the sweep stops timing new variants after this (then remaining ones are listed as skipped)
ROTATE_BYTES = 200e6
NF4_BLOCKSIZE = 64


def parse_args(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="outxin,outxin,...")
    p.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    p.add_argument("--quick", action="store_true", help="11008x4096 only")
    p.add_argument("--tune", action="store_true", help="sweep the Triton kernels' launch knobs instead of the table")
    p.add_argument("--tune-out", default=None, help="JSON file for the sweep's rows and best configurations")
    p.add_argument("--tune-shapes", default=",".join(f"{o}x{i}" for o, i in TUNE_SHAPES))
    p.add_argument("--tune-max", type=int, default=0, help="only the first N variants per kernel (smoke runs)")
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


def nf4_bytes(n, k, blocksize=NF4_BLOCKSIZE, double_quant=False):
    nblocks = math.ceil(n / blocksize)
    absmax = nblocks + 4 * math.ceil(nblocks / 256) if double_quant else 4 * nblocks  # uint8 + nested fp32
    return n // 2 + absmax + 2 * n + 8 * k


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
    def __init__(self, shape, density, device, double_quant=False):
        from spiel.ops import backend_info, nf4_quantize, use_backend

        self.shape, self.device = shape, device
        self.n = shape[0] * shape[1]
        self.k = int(round(self.n * density))
        g = torch.Generator(device=device).manual_seed(hash(("nf4", shape, density)) % 2**31)
        backend = "triton" if device.type == "cuda" and backend_info()["triton"]["available"] else "torch"
        self.sets = []
        for _ in range(_rotation(nf4_bytes(self.n, self.k, double_quant=double_quant))):
            w = torch.randn(shape, device=device, generator=g).to(torch.bfloat16)
            with use_backend(backend):
                nf4 = nf4_quantize(w, NF4_BLOCKSIZE, double_quant=double_quant)
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
# tuning sweep (Triton launch knobs); see the module docstring and the *_CONFIG tables it feeds
# ---------------------------------------------------------------------------------------------------------
def _knobs(block, warps, persistent=0, evict="", store="", **extra):
    return dict(block=block, num_warps=warps, persistent=persistent, evict=evict, store=store, **extra)


HINTS = (("", ""), ("evict_first", ".cs"), ("evict_first", ""), ("", ".cs"))


def merge_variants():
    """bf16 merge knob sets, most promising first (the budget cuts from the end). Registers (sm_90, Triton
    3.6) keep every persistent entry resident: 8192 x 8 warps 64 regs (4 CTAs/SM), 16384 x 16 warps 61 (2)."""
    chunked = [(8192, 8), (4096, 4), (4096, 8), (16384, 8), (16384, 16), (32768, 16), (8192, 4), (8192, 16),
               (65536, 16), (4096, 16)]
    persistent = [(8192, 8, 2), (8192, 8, 4), (8192, 8, 3), (4096, 4, 4), (4096, 4, 8), (16384, 16, 1),
                  (16384, 16, 2), (16384, 8, 1), (16384, 8, 2), (8192, 4, 4), (4096, 8, 4), (32768, 16, 1)]
    out = [_knobs(b, w) for b, w in chunked] + [_knobs(b, w, m) for b, w, m in persistent]
    out += [_knobs(b, w, 0, *HINTS[1]) for b, w in chunked[:6]]
    out += [_knobs(b, w, m, *HINTS[1]) for b, w, m in persistent[:6]]
    for h in HINTS[2:]:
        out += [_knobs(8192, 8, 0, *h), _knobs(8192, 8, 4, *h), _knobs(16384, 16, 2, *h)]
    return out


def nf4_variants():
    """NF4 (bf16 out) knob sets, most promising first. Registers (sm_90, Triton 3.6): 8192 x 8 warps 64
    (4 CTAs/SM) chunked or persistent, 4096 x 4 warps persistent 80 (6 CTAs/SM), 4096 x 8 warps 42 (5)."""
    chunked = [(8192, 8), (4096, 4), (8192, 4), (16384, 16), (4096, 8), (8192, 16), (16384, 8), (32768, 16)]
    persistent = [(8192, 8, 2), (8192, 8, 3), (4096, 4, 4), (4096, 4, 6), (16384, 16, 1), (4096, 8, 5),
                  (4096, 8, 4), (16384, 16, 2)]
    out = []
    for decode in ("table", "pairs"):
        out += [_knobs(b, w, decode=decode, group=4) for b, w in chunked]
        out += [_knobs(b, w, m, decode=decode, group=4) for b, w, m in persistent]
    for decode in ("table", "pairs"):
        out += [_knobs(b, w, 0, *HINTS[1], decode=decode, group=4) for b, w in chunked[:4]]
        out += [_knobs(b, w, m, *HINTS[1], decode=decode, group=4) for b, w, m in persistent[:4]]
    for h in HINTS[2:]:
        out += [_knobs(8192, 8, 0, *h, decode="table", group=4), _knobs(8192, 8, 2, *h, decode="table", group=4)]
    out += [_knobs(8192, 8, decode=d, group=8) for d in ("table", "pairs")]  # two 16-byte stores per group
    return out


def knob_label(k):
    s = f"{k['block']}x{k['num_warps']}w" + (f" P{k['persistent']}" if k["persistent"] else "")
    s += "".join(f" {k[x]}" for x in ("evict", "store") if k[x])
    if "decode" in k:
        s += f" {k['decode']}" + (f" g{k['group']}" if k["group"] != 4 else "")
    return s


def _tune_module(kind):
    from spiel.ops.backends.triton import merge as tmerge, nf4 as tnf4

    return tmerge if kind == "merge" else tnf4


def _tune_fn(kind):
    import spiel.ops  # noqa: F401  (registers the kernels)
    from spiel.ops._dispatch import kernel_for

    return kernel_for("merge_delta" if kind == "merge" else "nf4_dequantize_add_delta", "triton")


def _tune_call(kind, knobs, fn, *args):
    module = _tune_module(kind)
    module._CONFIG_OVERRIDE.clear()
    module._CONFIG_OVERRIDE.update(knobs)
    try:
        fn(*args)
    finally:
        module._CONFIG_OVERRIDE.clear()


_TINY = {}


def _tune_compile(kind, knobs):
    """Pool worker: compile one variant by launching it on tiny inputs with the same dtypes and specialisation
    (int32 indices, n divisible by 16) as the sweep's; Triton's disk cache then holds it for the parent."""
    from spiel.ops import nf4_quantize, use_backend

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    if kind not in _TINY:
        w = torch.randn(64, 4096, device=dev).to(torch.bfloat16)
        idx = torch.arange(0, w.numel(), 97, device=dev, dtype=torch.int32)
        val = torch.randn(idx.numel(), device=dev)
        if kind == "merge":
            _TINY[kind] = (w, idx, val, torch.empty_like(w))
        else:
            with use_backend("torch"):
                nf4 = nf4_quantize(w, NF4_BLOCKSIZE, double_quant=True)
            _TINY[kind] = (*nf4.op_args()[:6], idx, val, torch.empty_like(w))
    _tune_call(kind, knobs, _tune_fn(kind), *_TINY[kind])
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _start_precompile(jobs):
    """Start compiling ``jobs`` [(kind, knobs)] in spawned worker processes; returns (pool, results) or None."""
    workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 2), 12)
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        return pool, [pool.apply_async(_tune_compile, job) for job in jobs], workers
    except Exception as exc:
        print(f"note: no compile pool ({type(exc).__name__}: {exc}); compiling in the timing loop", flush=True)
        return None


def _finish_precompile(started, timeout_s):
    if started is None:
        return
    pool, results, workers = started
    t0 = time.perf_counter()
    try:
        for r in results:
            r.wait(max(0.0, timeout_s - (time.perf_counter() - t0)))
        ok, errors = 0, set()
        for r in results:
            try:
                r.get(0)
                ok += 1
            except Exception as exc:
                errors.add(f"{type(exc).__name__}: {str(exc)[:100]}")
        print(f"precompiled {ok}/{len(results)} variants with {workers} workers "
              f"(waited {time.perf_counter() - t0:.1f} s)" + (f"; errors: {sorted(errors)[:3]}" if errors else ""),
              flush=True)
    finally:
        pool.terminate()
        pool.join()


class _TuneCase:
    """One kernel on one shape: rotated inputs, the reference output (once), the same-bytes copy ceiling."""

    def __init__(self, kind, shape, device):
        self.kind, self.shape, self.device = kind, shape, device
        if kind == "merge":
            self.case = MergeCase(shape, TUNE_DENSITY, device)
            self.bytes = merge_bytes(self.case.n, self.case.k)
            self.sets = [(w, idx, val, torch.empty_like(w)) for w, idx, val in self.case.sets]
        else:
            self.case = NF4Case(shape, TUNE_DENSITY, device, double_quant=True)
            self.bytes = nf4_bytes(self.case.n, self.case.k, double_quant=True)
            self.sets = [(*nf4.op_args()[:6], idx, val, torch.empty(shape, dtype=torch.bfloat16, device=device))
                         for nf4, idx, val in self.case.sets]
        from spiel.ops._dispatch import kernel_for

        args = self.sets[0][:-1]
        self.want = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)
        kernel_for("merge_delta" if kind == "merge" else "nf4_dequantize_add_delta", "torch")(*args, self.want)

    def copy_ms(self):
        x = torch.empty(self.bytes // 4, dtype=torch.bfloat16, device=self.device).normal_()  # read + write = bytes
        ms = time_fn_ms(lambda: torch.empty_like(x).copy_(x), self.device)
        del x
        return ms

    def run(self, knobs, fn):
        """(ms, note) of one variant: exactness check, then the timing."""
        args = self.sets[0][:-1]
        got = torch.full_like(self.want, float("nan"))
        _tune_call(self.kind, knobs, fn, *args, got)
        if not torch.equal(got, self.want):
            return float("nan"), "MISMATCH vs reference"
        nxt = _cycler(self.sets)
        module = _tune_module(self.kind)
        module._CONFIG_OVERRIDE.update(knobs)
        try:
            return time_fn_ms(lambda: fn(*nxt()), self.device), ""
        finally:
            module._CONFIG_OVERRIDE.clear()


def time_fn_ms(fn, device, warmup_ms=5, rep_ms=30):
    from harness import time_fn

    fn()
    return time_fn(fn, device, warmup_ms, rep_ms)["ms"]


def tune(runner: Runner, device, args):
    """The knob sweep; returns its JSON-able result."""
    from harness import environment

    from spiel.ops.backends.triton import merge as tmerge

    t_start = time.perf_counter()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.tune_shapes.split(",")]
    variants = {"merge": merge_variants(), "nf4": nf4_variants()}
    if args.tune_max:
        variants = {kind: v[: args.tune_max] for kind, v in variants.items()}
    jobs = {json.dumps([kind, dict(knobs, persistent=min(knobs["persistent"], 1))]): (kind, knobs)
            for kind in variants for knobs in variants[kind]}  # the programs per SM are no compile key
    jobs = list(jobs.values())
    started = _start_precompile(jobs) if device.type == "cuda" else None
    cases = {(kind, shape): _TuneCase(kind, shape, device) for shape in shapes for kind in variants}
    _finish_precompile(started, timeout_s=max(5.0, 45 - (time.perf_counter() - t_start)))  # before any timing
    rows, copy = [], {}
    for (kind, shape), case in cases.items():  # ceilings and baselines of the same run
        label = f"{shape[0]}x{shape[1]}"
        copy[kind, label] = case.copy_ms()
        base = f"{kind}: " + ("torch clone+scatter_add_" if kind == "merge" else "bnb dequantize_4bit+scatter_add_")
        for name, factory in ((base, case.case.baseline), (f"{kind}: spiel cuda", lambda: case.case.spiel("cuda"))):
            row = {"kernel": kind, "shape": label, "config": name, "baseline": True}
            try:
                step = factory()
                step, note = step if isinstance(step, tuple) else (step, "")
                row.update(ms=time_fn_ms(step, device), note=note)
            except Skip as exc:
                row.update(ms=float("nan"), note=f"skipped: {exc}")
            except Exception as exc:
                row.update(ms=float("nan"), note=f"failed: {type(exc).__name__}: {str(exc)[:80]}")
            rows.append(row)
    fns = {kind: _tune_fn(kind) for kind in variants}
    order = [(kind, i) for i in range(max(len(v) for v in variants.values())) for kind in variants
             if i < len(variants[kind])]  # interleaved: the budget cuts both kernels alike
    for kind, i in order:
        knobs = variants[kind][i]
        over = time.perf_counter() - t_start > TUNE_BUDGET_S
        for shape in shapes:
            case = cases[kind, shape]
            row = {"kernel": kind, "shape": f"{shape[0]}x{shape[1]}", "config": knob_label(knobs), "knobs": knobs,
                   "default": i == 0}
            if over:
                row.update(ms=float("nan"), note="skipped: time budget")
            else:
                try:
                    ms, note = case.run(knobs, fns[kind])
                except Exception as exc:  # a variant that does not compile or run is reported, not fatal
                    ms, note = float("nan"), f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                row.update(ms=ms, note=note)
            rows.append(row)
        if not over:
            print(f"{kind:5s} {knob_label(knobs):34s} " + "  ".join(
                f"{r['shape']} {r['ms']:.4f} ms{' ' + r['note'] if r['note'] else ''}" for r in rows[-len(shapes):]),
                flush=True)
    # derived columns, best per kernel and shape
    for r in rows:
        case = cases[r["kernel"], tuple(int(x) for x in r["shape"].split("x"))]
        base = next((b["ms"] for b in rows if b.get("baseline") and b["kernel"] == r["kernel"]
                     and b["shape"] == r["shape"] and "spiel" not in b["config"]), float("nan"))
        r["gbps"] = case.bytes / (r["ms"] * 1e-3) / 1e9
        r["pct_copy"] = 100 * copy[r["kernel"], r["shape"]] / r["ms"]
        r["x_base"] = base / r["ms"]
    best = {}
    for r in rows:
        if "knobs" in r and not r["note"] and math.isfinite(r["ms"]):
            b = best.setdefault(r["kernel"], {}).get(r["shape"])
            if b is None or r["ms"] < b["ms"]:
                best[r["kernel"]][r["shape"]] = r
    rows.sort(key=lambda r: (r["kernel"], r["shape"], "knobs" in r, r["ms"] if math.isfinite(r["ms"]) else math.inf))
    print_table(rows, [("kernel", "kernel"), ("shape", "shape"), ("config", "config"), ("ms", "ms"),
                       ("GB/s", "gbps"), ("% copy", "pct_copy"), ("x base", "x_base"),
                       ("note", lambda r: clip(r["note"], 60))],
                title=f"Triton knob sweep at {TUNE_DENSITY:g} density, fastest first (% copy: same-bytes copy of "
                      f"this run; x base: vs clone+scatter_add_ / bnb dequantize_4bit+scatter_add_)")
    print("\n### top 5 per kernel and shape (x v1: speed-up over the v1 knobs, the first config swept)")
    paste, both = [], {}
    for kind, per_shape in best.items():
        table = "MERGE_CONFIG" if kind == "merge" else "DEQUANT_CONFIG"
        for label, r in per_shape.items():
            mine = [x for x in rows if x["kernel"] == kind and x["shape"] == label and "knobs" in x]
            v1 = next((x["ms"] for x in mine if x["default"]), float("nan"))
            for x in sorted((x for x in mine if not x["note"] and math.isfinite(x["ms"])), key=lambda x: x["ms"])[:5]:
                print(f"{kind:5s} {label:10s} {x['config']:34s} {x['ms']:.4f} ms  {x['pct_copy']:5.1f}% of copy  "
                      f"{x['x_base']:.2f}x base  {v1 / x['ms']:.3f}x v1", flush=True)
            for x in mine:  # geometric mean over shapes of ms / best ms: one config for every size
                ratio = math.inf if x["note"] else math.log(x["ms"] / r["ms"])
                both.setdefault((kind, x["config"]), []).append(ratio)
            size = "large" if math.prod(int(x) for x in label.split("x")) >= tmerge.LARGE_N else "small"
            paste.append(f"{table}[(2, {size!r})] = dict({', '.join(f'{k}={v!r}' for k, v in r['knobs'].items())})"
                         f"  # {label}: {r['ms']:.4f} ms, {r['pct_copy']:.1f}% of copy, {r['x_base']:.2f}x base")
    print("\n### one config for all shapes (geometric mean of ms / best ms over the shapes)")
    for kind in best:
        cands = [(math.exp(sum(v) / len(v)), c) for (k, c), v in both.items() if k == kind and len(v) == len(shapes)]
        for score, c in sorted(cands)[:3]:
            print(f"{kind:5s} {c:34s} {score:.3f}x the per-shape best", flush=True)
    print("\n### paste into spiel/ops/backends/triton/{merge,nf4}.py (fp32: same knobs, block // 2)")
    print("\n".join(paste), flush=True)
    result = {"env": environment(device), "density": TUNE_DENSITY, "seconds": time.perf_counter() - t_start,
              "copy_ms": {f"{k} {s}": v for (k, s), v in copy.items()},
              "copy_ceiling_tbps": runner.ceil.get("copy_tbps"), "rows": rows,
              "best": {k: {s: {"knobs": r["knobs"], "ms": r["ms"], "pct_copy": r["pct_copy"], "x_base": r["x_base"]}
                           for s, r in v.items()} for k, v in best.items()},
              "paste": paste}
    for r in rows:
        runner.record({"case": f"{r['shape']}@{TUNE_DENSITY:g}", "provider": f"tune {r['kernel']}: {r['config']}",
                       "shape": r["shape"], "density": TUNE_DENSITY, "ms": r["ms"], "note": r["note"],
                       "extra": {"kind": f"tune-{r['kernel']}", "knobs": r.get("knobs"), "pct_copy": r["pct_copy"]}})
    print(f"\nsweep took {result['seconds']:.1f} s", flush=True)
    if args.tune_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.tune_out)), exist_ok=True)
        with open(args.tune_out, "w") as f:
            json.dump(_finite(result), f, indent=1, default=str)
        print(f"wrote {args.tune_out}", flush=True)
    return result


def _finite(x):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    import spiel.ops  # noqa: F401  (registers the backends)

    def body(runner: Runner):
        print_header("forward", device, runner.ceil)
        if args.tune:
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise SystemExit("--tune needs a CUDA device (or TRITON_INTERPRET=1 with --device cpu, tiny shapes)")
            tune(runner, device, args)
            return
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

    def report(runner: Runner):
        if args.tune:
            return  # tune() printed its own tables
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
        for r in runner.rows:
            if r.get("case") == "11008x4096@0.01" and "spiel" in str(r.get("provider")) and r.get("ms"):
                p, x = pct(r), speedup(r)
                print(f"  {r['provider']:30s} {fmt(p)}% of copy" + (f", {x:.2f}x baseline" if x else ""), flush=True)

    return guarded_main(lambda: Runner("forward", device, args.csv, warmup_ms=10, rep_ms=args.rep_ms,
                                       measure_memory=False), body, report)


if __name__ == "__main__":
    sys.exit(main())
