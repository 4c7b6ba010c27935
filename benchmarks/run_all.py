"""Run the whole benchmark suite with one command and print one compact table at the end.

    python benchmarks/run_all.py                    # GPU: e2e (7B shape), layer, memory; ~5-6 min on an H100
    python benchmarks/run_all.py --out $OUT         # CSV + plots into $OUT (results.csv, plots/*.png)
    python benchmarks/run_all.py --only e2e --model 1b
    python benchmarks/run_all.py --device cpu       # CPU smoke run (tiny shapes), ~2-4 min

Each suite runs in its own process (a crash costs one suite, not the run) under a shared time budget
(--budget-s, default 540 s so the run fits a 10-minute command): the e2e benchmark stops starting providers
when its share is spent, and whatever was measured is still in the CSV and in the summary. All suites of one
run share a run id; the summary reads this run's rows back from the CSV.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import harness  # noqa: E402

SUITES = ("e2e", "layer", "memory")
MIN_SUITE_S = {"e2e": 60, "layer": 90, "memory": 30}  # also what is kept back for the suites after one


def ensure_bnb(install: bool) -> str:
    """bitsandbytes status; installs the wheel carried in .whl/ when it does not import (offline pip)."""
    probe = [sys.executable, "-c", "import bitsandbytes, sys; sys.stdout.write(bitsandbytes.__version__)"]
    try:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            return f"bitsandbytes {out.stdout.strip()}"
    except Exception:
        pass
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "bitsandbytes-*.whl")))
    if not install or not wheels:
        return "bitsandbytes not importable: its rows are skipped" + ("" if wheels else " (no wheel in .whl/)")
    print(f"note: installing {os.path.basename(wheels[-1])} (offline, --no-deps)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheels[-1]],
                       timeout=240, check=False)
        out = subprocess.run(probe, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            return f"bitsandbytes {out.stdout.strip()} (installed from .whl/)"
    except Exception as exc:
        return f"bitsandbytes install failed: {exc}"
    return "bitsandbytes still not importable after installing the wheel: its rows are skipped"


def suite_cmd(name: str, args, budget: float):
    cpu = args.device == "cpu"
    cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--csv", args.csv]
    if args.device:
        cmd += ["--device", args.device]
    if name == "layer":
        if cpu:
            cmd += ["--small", "--rep-ms", "20"]
        if args.quick:
            cmd += ["--shapes", "11008x4096" if not cpu else "96x64"]
    elif name == "memory":
        if cpu:
            cmd += ["--small", "--no-time", "--densities", "0.01,0.04", "--dims", "32,64"]
        if args.quick and not cpu:
            cmd += ["--densities", "0.005,0.02", "--dims", "2048,4096"]
    elif name == "e2e":
        model = args.model or ("tiny" if cpu else "7b")
        cmd += ["--model", model, "--budget-s", f"{max(30.0, budget):.0f}"]
        if args.e2e_providers:
            cmd += ["--providers", args.e2e_providers]
        if cpu:
            cmd += ["--steps", "2", "--warmup", "1", "--reselection-steps", "2", "--accumulation-steps", "1"]
        elif args.quick:
            cmd += ["--steps", "20", "--warmup", "5", "--baseline-steps", "5"]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
    return cmd


def _f(v):
    try:
        x = float(v)
        return x if math.isfinite(x) else None
    except (TypeError, ValueError):
        return None


def _extra(r):
    ex = r.get("extra")
    if isinstance(ex, dict):
        return ex
    try:
        return json.loads(ex or "{}")
    except ValueError:
        return {}


def summary(rows, notes) -> None:
    """The compact end-of-run tables (kept short: a remote runner may only return the output's tail)."""
    print("\n" + "=" * 100)
    print("SUMMARY (this run)")
    if rows:
        r0 = rows[0]
        print(f"device: {r0.get('gpu')} | torch {r0.get('torch')} | triton {r0.get('triton')} | spiel {r0.get('spiel')}"
              f" | commit {r0.get('commit')} | run {r0.get('run_id')}")
        ceil = next((r for r in rows if _f(r.get("copy_tbps"))), None)
        if ceil:
            print(f"measured ceilings: copy {harness.fmt(_f(ceil['copy_tbps']))} TB/s, bf16 GEMM "
                  f"{harness.fmt(_f(ceil['gemm_tflops']))} TFLOP/s")
    for n in notes:
        print(f"note: {n}")

    e2e = [r for r in rows if r["suite"] == "e2e"]
    for model in dict.fromkeys(r["case"] for r in e2e):
        sel = [r for r in e2e if r["case"] == model]
        table = []
        for r in sel:
            ex = _extra(r)
            table.append({"provider": r["provider"], "ms": _f(r["ms"]), "steady": _f(ex.get("ms_steady")),
                          "upd": ex.get("n_update"),
                          "ovh": None if _f(ex.get("update_overhead")) is None else 100 * _f(ex["update_overhead"]),
                          "x": _f(r["x_ref"]), "ref": ex.get("reference", ""),
                          "peak": (_f(r["peak_mib"]) / 1024) if _f(r["peak_mib"]) else None,
                          "tr": (_f(r["k"]) / 1e6) if _f(r["k"]) else None, "note": harness.clip(r["note"], 48)})
        harness.print_table(table, [("provider", "provider"), ("ms/step", "ms"), ("no-update ms", "steady"),
                                    ("upd steps", "upd"), ("upd +%", "ovh"), ("x ref", "x"), ("ref", "ref"),
                                    ("peak GiB", "peak"), ("trainable M", "tr"), ("note", "note")],
                            title=f"end to end, --model {model}")
        try:
            import bench_e2e

            by = {}
            for r in sel:
                if _f(r["ms"]):
                    ex = _extra(r)
                    by[r["provider"]] = {"ms_avg": _f(r["ms"]), "peak_gib": (_f(r["peak_mib"]) or float("nan")) / 1024,
                                         "n_update": ex.get("n_update"),
                                         "update_overhead": _f(ex.get("update_overhead"))}
            checks = bench_e2e.check_targets(by)
            harness.print_table([dict(c=c[0], v=c[1], t=c[2], r=c[3]) for c in checks],
                                [("target check", "c"), ("value", "v"), ("target", "t"), ("result", "r")],
                                title=f"targets, --model {model} (same run)")
        except Exception as exc:
            print(f"note: target checks not computed: {exc}")

    layer = [r for r in rows if r["suite"] == "layer" and r.get("case")]
    if layer:
        shapes = list(dict.fromkeys(r["case"] for r in layer))
        labels = {}
        for r in layer:
            name = r["provider"].split("@")[0]
            matched = _extra(r).get("matched", "")
            if _f(r["density"]) and matched:
                name += f" @{matched}" if matched.startswith("r") else f" @{float(matched):.1%}"
            labels.setdefault(name, {})[r["case"]] = r
        table = []
        for label, per in labels.items():
            row = {"provider": label}
            for s in shapes:
                r = per.get(s)
                if r is None:
                    row[s] = "-"
                elif _f(r["ms"]) is None:
                    row[s] = harness.clip(r["note"] or "-", 28)
                else:
                    x, mib = _f(r["x_ref"]), _f(r["peak_mib"])
                    parts = ([f"{harness.fmt(x)}x"] if x is not None else []) + \
                        ([f"+{harness.fmt(mib)} MiB"] if mib is not None else [])
                    row[s] = harness.fmt(_f(r["ms"])) + (f" ({', '.join(parts)})" if parts else "")
            table.append(row)
        T = _extra(layer[0]).get("T", "?")
        harness.print_table(table, [("provider", "provider")] + [(s, s) for s in shapes],
                            title=f"one layer, T={T}: ms per training step (x frozen, peak extra MiB); "
                                  "@rN = LoRA-rN-matched k")

    fits = [r for r in rows if r["suite"] == "memory" and r["case"] == "fit"]
    if fits:
        table = []
        for r in fits:
            ex = _extra(r)
            table.append({"provider": r["provider"], "a": _f(ex.get("bpd_static")), "ap": _f(ex.get("bpd_peak")),
                          "bp": _f(ex.get("b_peak")), "ws": _f(ex.get("bpw_static")), "wp": _f(ex.get("bpw_peak"))})
        harness.print_table(table, [("provider", "provider"), ("B/delta static", "a"), ("B/delta peak", "ap"),
                                    ("fixed peak MiB", "bp"), ("static B per out*in", "ws"),
                                    ("peak B per out*in", "wp")],
                            title="memory over frozen: fitted bytes per delta, and per weight element at fixed k")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for results.csv and plots/ (default benchmarks/results, "
                                                "or $SPIEL_BENCH_OUT)")
    p.add_argument("--csv", default=None, help="CSV path (default OUT/results.csv)")
    p.add_argument("--only", default=",".join(SUITES), help="comma list of suites: e2e,layer,memory")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny shapes)")
    p.add_argument("--model", default=None, help="e2e shape: 7b (GPU default), 1b, 70b, tiny (CPU default)")
    p.add_argument("--e2e-providers", default=None, help="comma list for bench_e2e --providers")
    p.add_argument("--steps", type=int, default=None, help="bench_e2e --steps")
    p.add_argument("--quick", action="store_true", help="one layer shape, shorter e2e windows (~3 min)")
    p.add_argument("--budget-s", type=float, default=540.0, help="time budget of the whole run (default 540 s)")
    p.add_argument("--no-install-bnb", action="store_true",
                   help="do not pip-install .whl/bitsandbytes-*.whl when bitsandbytes does not import")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = args.out or os.environ.get("SPIEL_BENCH_OUT") or harness.DEFAULT_OUT
    os.makedirs(out, exist_ok=True)
    args.csv = args.csv or os.path.join(out, "results.csv")
    rid = harness.run_id()
    os.environ["SPIEL_BENCH_RUN_ID"] = rid
    os.environ["SPIEL_BENCH_CSV"] = args.csv
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise SystemExit(f"unknown suites {bad}; choose from {SUITES}")
    suites = [s for s in SUITES if s in suites]
    notes = [ensure_bnb(not args.no_install_bnb)]
    print(f"== run_all: suites {suites}, run id {rid}, CSV {args.csv}, budget {args.budget_s:.0f} s; {notes[0]}",
          flush=True)
    for i, name in enumerate(suites):
        elapsed = time.perf_counter() - start
        reserve = sum(MIN_SUITE_S[s] for s in suites[i + 1:])
        left = args.budget_s - elapsed - reserve
        if left < MIN_SUITE_S[name]:
            notes.append(f"{name}: not run, time budget spent ({elapsed:.0f} s)")
            continue
        cmd = suite_cmd(name, args, left - 20)
        print(f"\n== {name}: {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])}"
              f" (up to {left:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, timeout=left, cwd=ROOT).returncode
            if rc != 0:
                notes.append(f"{name}: exited with {rc}")
        except subprocess.TimeoutExpired:
            notes.append(f"{name}: killed after {left:.0f} s (time budget); its rows so far are in the CSV")
        notes.append(f"{name}: {time.perf_counter() - t0:.0f} s")
    rows = []
    if os.path.exists(args.csv):
        rows = [r for r in harness.read_rows(args.csv) if r.get("run_id") == rid]
    if not args.no_plots:
        try:
            subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), "--csv", args.csv, "--out",
                            os.path.join(out, "plots"), "--run-id", rid], timeout=120, cwd=ROOT)
        except Exception as exc:
            notes.append(f"plots failed: {exc}")
    summary(rows, notes)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; CSV {args.csv}; plots {os.path.join(out, 'plots')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
