"""Shared benchmark harness: timing, peak memory, device ceilings, CSV rows and tables.

Every benchmark script declares its cases and providers (name -> factory) and hands them to
:class:`Runner`. A factory builds everything a provider needs (weights, rotated inputs) and returns a
no-argument callable that runs one step; it may raise :class:`Skip` (optional package missing, option not
exposed) and any other exception becomes a note in the table -- the run goes on.

Timing: ``triton.testing.do_bench`` medians with 20/80 quantiles after warm-up on CUDA (it also flushes
the L2 cache between calls); on CPU a plain perf_counter loop. Peak memory: one step after warm-up,
``max_memory_allocated`` minus what was allocated before the step (the inputs and weights already exist,
so this is the memory the step itself needs above them).

Rows go to a CSV (default ``benchmarks/results/results.csv``; ``--csv`` or ``SPIEL_BENCH_CSV``) with the
GPU name, versions, git commit and the device's copy bandwidth / bf16 GEMM rate measured in the same run.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results")
CSV_COLUMNS = [
    "run_id", "timestamp", "suite", "case", "provider", "shape", "k", "density", "ms", "ms_p20", "ms_p80",
    "x_ref", "peak_mib", "note", "extra", "gpu", "torch", "triton", "spiel", "commit", "copy_tbps",
    "gemm_tflops",
]


class Skip(Exception):
    """Raised by a provider factory when the provider cannot run here (optional package, missing option).

    A factory returns the step callable, or ``(step, note)`` to attach a note to its row."""


class ContextLost(RuntimeError):
    """The CUDA context is unusable after an error (illegal address, device assert)."""


# ---------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            sha = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10)
            return sha + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except Exception:
        pass
    return "unknown"


def versions() -> Dict[str, str]:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "none"
    try:
        import spiel

        info["spiel"] = getattr(spiel, "__version__", "?")
    except Exception as exc:
        info["spiel"] = f"import failed: {type(exc).__name__}"
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


_ENV_CACHE: Dict[str, object] = {}


def environment(device: torch.device) -> Dict[str, object]:
    if "env" not in _ENV_CACHE:
        env = {"gpu": device_name(device), "commit": git_commit()}
        env.update(versions())
        _ENV_CACHE["env"] = env
    return dict(_ENV_CACHE["env"])


def spiel_backends() -> Dict[str, bool]:
    """Which spiel backends are available here (empty if spiel does not import)."""
    try:
        import spiel.ops

        info = spiel.ops.backend_info()
        return {b: bool(info[b]["available"]) for b in ("torch", "triton", "cuda")}
    except Exception:
        return {}


def run_id() -> str:
    rid = os.environ.get("SPIEL_BENCH_RUN_ID")
    if not rid:
        rid = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.environ["SPIEL_BENCH_RUN_ID"] = rid  # children share it
    return rid


# ---------------------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def context_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1).item()
        return True
    except Exception:
        return False


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100
            ) -> Dict[str, float]:
    """Median and 20/80 quantiles of ``fn`` in milliseconds."""
    if device.type == "cuda":
        try:
            import triton.testing

            q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return {"ms": float(q[0]), "ms_p20": float(q[1]), "ms_p80": float(q[2])}
        except ImportError:
            pass
        # CUDA events fallback
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        times: List[float] = []
        deadline = time.perf_counter() + (warmup_ms + rep_ms) / 1e3
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return _quantiles(times)
    fn()
    times = []
    deadline = time.perf_counter() + max(rep_ms, 1) / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def paired_ratios(fns: Dict[str, Callable[[], object]], baseline: str, device: torch.device, rounds: int = 7,
                  rep_ms: float = 40) -> Dict[str, Dict[str, float]]:
    """Speed-up of each provider over ``baseline`` from interleaved timings: ``rounds`` rounds, each timing every
    provider once (order rotated per round), the ratio ``baseline ms / provider ms`` taken within a round.
    Clock and power drift between separate measurements moves single medians by a few percent; a within-round
    ratio cancels most of it. Returns ``name -> {"x": median ratio, "x_min", "x_max"}`` (baseline excluded)."""
    names = list(fns)
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    per_round: List[Dict[str, float]] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        per_round.append({n: time_fn(fns[n], device, warmup_ms=5, rep_ms=rep_ms)["ms"] for n in order})
    out: Dict[str, Dict[str, float]] = {}
    for n in names:
        if n == baseline:
            continue
        xs = sorted(t[baseline] / t[n] for t in per_round)
        out[n] = {"x": _quantiles(xs)["ms"], "x_min": xs[0], "x_max": xs[-1]}
    return out


def _quantiles(times: Sequence[float]) -> Dict[str, float]:
    ts = sorted(times)

    def q(p: float) -> float:
        pos = p * (len(ts) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ts[lo] + (ts[hi] - ts[lo]) * (pos - lo)

    return {"ms": q(0.5), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory of one call of ``fn`` above what was allocated before it, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


_CEILINGS: Dict[str, float] = {}


def device_ceilings(device: torch.device) -> Dict[str, float]:
    """Measured copy bandwidth (TB/s, bytes read + written) and bf16 GEMM rate (TFLOP/s) of this device."""
    key = str(device)
    if key in _CEILINGS:
        return dict(_CEILINGS[key])
    res = {"copy_tbps": float("nan"), "gemm_tflops": float("nan"), "copy_ms": float("nan"),
           "gemm_ms": float("nan")}
    try:
        if device.type == "cuda":
            n_copy, n_gemm = 1 << 28, 8192  # 512 MiB bf16 copy, 8192^3 GEMM
        else:
            n_copy, n_gemm = 1 << 22, 512
        a = torch.empty(n_copy, dtype=torch.bfloat16, device=device).normal_()
        b = torch.empty_like(a)
        t = time_fn(lambda: b.copy_(a), device)["ms"]
        res["copy_ms"] = t
        res["copy_tbps"] = 2 * a.numel() * a.element_size() / (t * 1e-3) / 1e12
        del a, b
        x = torch.randn(n_gemm, n_gemm, dtype=torch.bfloat16, device=device)
        w = torch.randn(n_gemm, n_gemm, dtype=torch.bfloat16, device=device)
        t = time_fn(lambda: x @ w, device)["ms"]
        res["gemm_ms"] = t
        res["gemm_tflops"] = 2 * n_gemm ** 3 / (t * 1e-3) / 1e12
        del x, w
        cleanup(device)
    except Exception as exc:  # never fatal
        print(f"note: device ceilings not measured: {type(exc).__name__}: {exc}", flush=True)
    _CEILINGS[key] = res
    return dict(res)


# ---------------------------------------------------------------------------------------------------------
# CSV and tables
# ---------------------------------------------------------------------------------------------------------
def csv_path(cli_value: Optional[str] = None) -> str:
    if cli_value:
        return cli_value
    if os.environ.get("SPIEL_BENCH_CSV"):
        return os.environ["SPIEL_BENCH_CSV"]
    out = os.environ.get("SPIEL_BENCH_OUT", DEFAULT_OUT)
    return os.path.join(out, "results.csv")


def append_rows(path: str, rows: Iterable[Dict[str, object]]) -> str:
    """Append rows (dicts with CSV_COLUMNS keys; missing -> empty) to ``path``; returns the path written."""
    rows = list(rows)
    if not rows:
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            root, ext = os.path.splitext(path)
            path = f"{root}.v2{ext or '.csv'}"
            print(f"note: {path!r}: existing CSV has other columns, writing to this file instead", flush=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            out = {}
            for c in CSV_COLUMNS:
                v = r.get(c, "")
                if c == "extra" and isinstance(v, dict):
                    v = json.dumps(v, sort_keys=True, default=str)
                elif isinstance(v, float):
                    v = "" if math.isnan(v) else f"{v:.6g}"
                out[c] = "" if v is None else v
            w.writerow(out)
    return path


def read_rows(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def clip(text: str, limit: int = 70) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_table(rows: Sequence[Dict[str, object]], columns: Sequence[tuple], title: str = "") -> str:
    """Print a compact markdown table; ``columns`` = [(header, key or callable(row))]."""
    cells = []
    for r in rows:
        line = []
        for _, key in columns:
            v = key(r) if callable(key) else r.get(key)
            line.append(fmt(v))
        cells.append(line)
    headers = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    out = []
    if title:
        out.append(f"\n### {title}")
    out.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")
    text = "\n".join(out)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------------------------------------
# running providers
# ---------------------------------------------------------------------------------------------------------
def short_error(exc: BaseException, limit: int = 160) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class Runner:
    """Runs (case, provider) jobs, appends CSV rows, survives failing providers.

    If a provider leaves the CUDA context unusable (illegal address, device-side assert) the runner
    re-runs the same script in a fresh process with the jobs done so far skipped (state passed in a JSON
    file), so the remaining providers still get measured and the final table holds every row.
    """

    def __init__(self, suite: str, device: torch.device, csv_file: Optional[str] = None,
                 warmup_ms: float = 25, rep_ms: float = 100, measure_memory: bool = True,
                 ceilings: bool = True):
        self.suite = suite
        self.device = device
        self.csv = csv_path(csv_file)
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.measure_memory = measure_memory
        self.rows: List[Dict[str, object]] = []
        self.done: set = set()
        self.run_id = run_id()
        self.env = environment(device)
        state_file = os.environ.get("SPIEL_BENCH_RESUME")
        if state_file and os.path.exists(state_file):
            with open(state_file) as f:
                state = json.load(f)
            if state.get("suite") == suite:
                self.rows = state["rows"]
                self.done = set(state["done"])
                _CEILINGS.update(state.get("ceilings", {}))
        self.ceil = device_ceilings(device) if ceilings else {}

    def base_row(self) -> Dict[str, object]:
        row = {"run_id": self.run_id, "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
               "suite": self.suite}
        row.update(self.env)
        row["copy_tbps"] = self.ceil.get("copy_tbps", "")
        row["gemm_tflops"] = self.ceil.get("gemm_tflops", "")
        return row

    def record(self, row: Dict[str, object]) -> Dict[str, object]:
        full = self.base_row()
        full.update(row)
        self.rows.append(full)
        append_rows(self.csv, [full])
        return full

    def run(self, case: str, provider: str, factory: Callable[[], Callable[[], object]],
            info: Optional[Dict[str, object]] = None, time_it: bool = True,
            ref_ms: Optional[float] = None, reference: bool = False) -> Dict[str, object]:
        """Build, warm up, measure peak memory and time one provider; returns its row (``x_ref`` = ms /
        ``ref_ms`` when given, 1 for the ``reference`` provider itself)."""
        key = f"{case}/{provider}"
        info = dict(info or {})
        if key in self.done:
            return next((r for r in self.rows if r.get("case") == case and r.get("provider") == provider), {})
        row: Dict[str, object] = {"case": case, "provider": provider, **info}
        fn = None
        try:
            fn = factory()
            if isinstance(fn, tuple):  # (step, note): a factory may explain what it measures
                fn, note = fn
                if note:
                    row["note"] = note
            fn()  # warm-up call (compiles / autotunes)
            sync(self.device)
            if self.measure_memory:
                row["peak_mib"] = peak_extra_mib(fn, self.device)
            if time_it:
                row.update(time_fn(fn, self.device, self.warmup_ms, self.rep_ms))
        except Skip as exc:
            row["note"] = f"skipped: {exc}"
        except Exception as exc:
            row["note"] = f"failed: {short_error(exc)}"
            if os.environ.get("SPIEL_BENCH_DEBUG"):
                traceback.print_exc()
        fn = None
        if reference and row.get("ms"):
            row["x_ref"] = 1.0
        elif ref_ms and row.get("ms"):
            row["x_ref"] = float(row["ms"]) / ref_ms
        self.done.add(key)
        alive = context_alive(self.device)
        if not alive:
            row["note"] = ((row.get("note") or "") + " (CUDA context lost)").strip()
        full = self.record(row)
        if not alive:
            raise ContextLost(key)
        try:
            cleanup(self.device)
        except Exception:
            pass
        return full

    def respawn(self, argv: Optional[List[str]] = None) -> int:
        """Continue the suite in a fresh process after the CUDA context was lost."""
        fd, path = tempfile.mkstemp(prefix="spiel-bench-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"suite": self.suite, "rows": self.rows, "done": sorted(self.done),
                       "ceilings": _CEILINGS}, f, default=str)
        env = dict(os.environ, SPIEL_BENCH_RESUME=path)
        print(f"note: CUDA context lost; continuing {self.suite} in a fresh process", flush=True)
        cmd = [sys.executable] + (argv if argv is not None else sys.argv)
        try:
            return subprocess.call(cmd, env=env)
        finally:
            os.unlink(path)


def guarded_main(runner_factory: Callable[[], Runner], body: Callable[[Runner], None],
                 summary: Callable[[Runner], None]) -> int:
    """Run ``body(runner)``; on a lost CUDA context continue in a fresh process; print ``summary``."""
    runner = runner_factory()
    try:
        body(runner)
    except ContextLost:
        return runner.respawn()
    summary(runner)
    print(f"\nrows appended to {runner.csv}", flush=True)
    return 0


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/results.csv, "
                                                    "or $SPIEL_BENCH_CSV, or $SPIEL_BENCH_OUT/results.csv)")
    return parser


def pick_device(name: Optional[str]) -> torch.device:
    if name:
        dev = torch.device(name)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def print_header(suite: str, device: torch.device, ceil: Optional[Dict[str, float]] = None) -> None:
    env = environment(device)
    print(f"== {suite} on {env['gpu']} | torch {env['torch']} triton {env['triton']} spiel {env['spiel']} "
          f"| commit {env['commit']}", flush=True)
    if ceil:
        print(f"   measured ceilings: copy {fmt(ceil.get('copy_tbps'))} TB/s, bf16 GEMM "
              f"{fmt(ceil.get('gemm_tflops'))} TFLOP/s", flush=True)
    backends = spiel_backends()
    if backends:
        print("   spiel backends: " + ", ".join(f"{b}={'yes' if ok else 'no'}" for b, ok in backends.items()),
              flush=True)
