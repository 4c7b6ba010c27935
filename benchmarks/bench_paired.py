"""Paired end-to-end timing: several providers of bench_e2e built in ONE process, their training windows
interleaved, so each ratio compares windows that ran a few seconds apart on the same host.

    python benchmarks/bench_paired.py                    # 7B: frozen, published, lora, spiel-ag-merged (~4 min)
    python benchmarks/bench_paired.py --providers frozen,spiel-ag-merged --rounds 6
    python benchmarks/bench_paired.py --model tiny --device cpu --rounds 2 --window 4   # CPU smoke test

Why: on the lent H100 hosts the same provider's step moves by 10-20% between processes (bench_e2e runs one
process per provider), more than the ratios the targets ask about. Here every provider is built first (the
7B models side by side: 55 GiB for the default four), each trains one warm-up window, then each round runs
one window per provider (the order rotates every round), and the table gives each provider's median window
and, per round, its ratio to the others; the median and range over rounds is the paired ratio.

A window is one reselection cycle (--window, default S = 20 steps) and starts on a cycle boundary, so a spiel
window holds exactly one AG probe and one index update: its mean step is what a training loop pays, index
updates included, and `upd +%` compares it with the window's plain steps (CUDA events at the step boundaries;
no host sync inside a window, as bench_e2e). Peak memory is not comparable inside one process: bench_e2e
measures it. Options of bench_e2e (e.g. --sparse-adamw-steps, --probe-gradient) pass through.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_e2e as E  # noqa: E402
import harness  # noqa: E402
from harness import Skip  # noqa: E402

DEFAULT = ["frozen", "published", "lora", "spiel-ag-merged"]
PAIRS = [("spiel-ag-merged", "published", 0.85), ("spiel-ag-merged", "lora", 0.65), ("spiel-ag", "published", 0.85),
         ("spiel-ag", "lora", 0.65), ("spiel-nf4", "published-nf4", 0.90), ("spiel-nf4", "qlora", 0.55),
         ("spiel-ag-merged-fp8", "frozen", 1.20)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default=",".join(DEFAULT), help="comma-separated bench_e2e providers")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (one window per provider each)")
    p.add_argument("--window", type=int, default=None, help="steps per window (default: --reselection-steps)")
    own, rest = p.parse_known_args(argv)
    args = E.parse_args(rest)  # model, device, csv and the spiel options, with bench_e2e's defaults
    for key, value in vars(own).items():
        setattr(args, key, value)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    args.window = args.window or args.reselection_steps
    if args.window < 1:
        raise SystemExit("--window must be >= 1")
    return args


class Provider:
    """One provider built in this process: its model, optimizer, scheduler and a step function."""

    def __init__(self, name: str, args, shape: dict, device, total_steps: int):
        self.name, self.notes = name, []
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        torch.manual_seed(0)
        model = E.build_model(shape, device, nf4=name in E.NF4_PROVIDERS)
        self.model, self.opt, self.sched, self.layers = E.setup_provider(name, model, shape, args, device,
                                                                        total_steps, self.notes)
        self.model.train()
        gen = torch.Generator(device=device).manual_seed(2)
        self.batches = [torch.randint(shape["vocab"], (args.batch, shape["seq"]), device=device, generator=gen)
                        for _ in range(2)]
        self.static_gib = ((torch.cuda.memory_allocated(device) - before) / E.GIB if device.type == "cuda"
                           else float("nan"))
        self.build_s = time.perf_counter() - t0
        self.i = 0
        self.windows = []  # per round: (ms per step, update overhead or nan)

    def step(self):
        self.i += 1
        return E.train_step(self.model, self.opt, self.sched, self.batches[(self.i - 1) % len(self.batches)])

    def window(self, steps: int, device) -> tuple:
        """``steps`` steps as a training loop runs them: (wall ms per step, update overhead, last loss)."""
        cuda = device.type == "cuda"
        harness.sync(device)
        events, flags = [], []
        t0 = time.perf_counter()
        loss = None
        for _ in range(steps):
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            before = E.layer_signature(self.layers) if self.layers else None
            loss = self.step()
            flags.append(E.update_step(before, E.layer_signature(self.layers)) if self.layers else False)
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        harness.sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / steps
        overhead = float("nan")
        if cuda and any(flags) and not all(flags):
            times = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:])]
            plain = [t for t, f in zip(times, flags) if not f]
            overhead = statistics.fmean(times) / statistics.fmean(plain) - 1
        return wall, overhead, float(loss) if loss is not None else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    E.quiet()
    device = harness.pick_device(args.device)
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in names if p not in E.ALL_PROVIDERS]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        raise SystemExit(f"--providers needs at least two distinct bench_e2e providers, got {names}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    shape = dict(E.SHAPES[args.model])
    if args.seq:
        shape["seq"] = args.seq
    W, R = args.window, args.rounds
    total = (R + 1) * W
    print(f"== bench_paired --model {args.model}: {', '.join(names)}; {R} rounds of one {W}-step window each "
          f"(+ one warm-up window), batch {args.batch} x {shape['seq']} tokens, device {device}", flush=True)
    ceil = harness.device_ceilings(device) if device.type == "cuda" else {}
    env = harness.environment(device)
    provs, skipped = [], {}
    for name in names:
        try:
            provs.append(Provider(name, args, shape, device, total))
            print(f"  built {name}: {provs[-1].static_gib:.2f} GiB, {provs[-1].build_s:.0f} s", flush=True)
        except Skip as exc:
            skipped[name] = str(exc)
            print(f"  {name}: skipped ({exc})", flush=True)
    if len(provs) < 2:
        print("fewer than two providers could be built: nothing to pair")
        return 0
    with E.GcClock(freeze=args.gc == "freeze"):
        for p in provs:  # warm-up window: compiles, allocator pools, spiel's first index update
            p.window(W, device)
        for r in range(R):
            order = provs[r % len(provs):] + provs[:r % len(provs)]
            for p in order:
                p.windows.append(p.window(W, device))
            print(f"  round {r + 1}: " + ", ".join(f"{p.name} {p.windows[-1][0]:.1f}" for p in provs), flush=True)

    by = {p.name: p for p in provs}
    rid = harness.run_id()
    rows = []
    for p in provs:
        ms = [w[0] for w in p.windows]
        upd = [w[1] for w in p.windows if w[1] == w[1]]
        ref = by.get(E.REFERENCE[p.name])
        ratios = [a[0] / b[0] for a, b in zip(p.windows, ref.windows)] if ref is not None and ref is not p else []
        q = harness._quantiles(ms)
        rows.append({"run_id": rid, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "suite": "e2e-paired",
                     "case": args.model, "provider": p.name, "shape": args.model,
                     "k": sum(m.values.numel() for m in p.layers) if p.layers else "",
                     "ms": statistics.median(ms), "ms_p20": q["ms_p20"], "ms_p80": q["ms_p80"],
                     "x_ref": statistics.median(ratios) if ratios else None, "peak_mib": None,
                     "note": "; ".join(p.notes),
                     "extra": {"window_ms": [round(v, 2) for v in ms], "update_overhead": upd,
                               "static_gib": p.static_gib, "rounds": R, "window": W, "reference": E.REFERENCE[p.name],
                               "loss": p.windows[-1][2], "order": "rotating", "providers": names},
                     **env, "copy_tbps": ceil.get("copy_tbps"), "gemm_tflops": ceil.get("gemm_tflops")})
    harness.append_rows(harness.csv_path(args.csv), rows)

    def fmt_range(values, digits=3):
        return (f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"
                if values else "-")

    table = []
    for p in provs:
        ms = [w[0] for w in p.windows]
        upd = [100 * w[1] for w in p.windows if w[1] == w[1]]
        table.append({"provider": p.name, "ms/step": fmt_range(ms, 1), "upd +%": fmt_range(upd, 2),
                      "static GiB": f"{p.static_gib:.2f}", "note": harness.clip("; ".join(p.notes), 50)})
    harness.print_table(table, [(c, c) for c in ("provider", "ms/step", "upd +%", "static GiB", "note")],
                        title=f"bench_paired --model {args.model}: median [min-max] over {R} rounds of {W}-step "
                              f"windows ({env.get('gpu')}, commit {env.get('commit')})")
    checks = []
    for a, b, limit in PAIRS + [(p.name, E.REFERENCE[p.name], None) for p in provs]:
        if a in by and b in by and a != b and not any(c["pair"] == f"{a} / {b}" for c in checks):
            ratios = [x[0] / y[0] for x, y in zip(by[a].windows, by[b].windows)]
            checks.append({"pair": f"{a} / {b}", "ratio": fmt_range(ratios),
                           "target": "-" if limit is None else f"<= {limit}",
                           "result": "-" if limit is None else ("PASS" if statistics.median(ratios) <= limit
                                                                else "FAIL")})
    for p in provs:
        upd = [w[1] for w in p.windows if w[1] == w[1]]
        if upd:
            checks.append({"pair": f"{p.name} index-update overhead", "ratio": fmt_range([100 * u for u in upd], 2),
                           "target": "<= 3%", "result": "PASS" if statistics.median(upd) <= 0.03 else "FAIL"})
    harness.print_table(checks, [(c, c) for c in ("pair", "ratio", "target", "result")],
                        title="paired ratios per round (median [min-max]; result on the median)")
    if skipped:
        print("skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
