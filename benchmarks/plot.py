"""Render PNG plots from the benchmark CSV (matplotlib, Agg backend).

    python benchmarks/plot.py                                  # latest run of benchmarks/results/results.csv
    python benchmarks/plot.py --csv R.csv --out DIR --run-id all

Plots (each skipped when its rows are missing):
  layer_time.png       one-layer training step: ms and x frozen per provider, per shape (LoRA-matched density)
  layer_memory.png     one-layer step: peak extra MiB per provider, per shape
  layer_density.png    sparse providers: ms vs density, per shape
  memory_k.png         extra memory over frozen vs number of deltas (static and peak) with the fitted line
  memory_size.png      extra memory over frozen vs out*in at fixed k
  memory_time.png      stack step time vs density (k sweep)
  e2e.png              end to end: ms/step (steady and with updates) and peak GiB per provider
  e2e_steps.png        per-step time of the spiel providers, update steps marked
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def _f(v):
    try:
        x = float(v)
        return x if x == x else None
    except (TypeError, ValueError):
        return None


def _extra(row):
    try:
        return json.loads(row.get("extra") or "{}")
    except ValueError:
        return {}


def load(path, run_id):
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return rows, None
    if run_id == "all":
        return rows, "all"
    if run_id in (None, "latest"):
        # the latest run id of each suite (suites of one run_all share one id)
        latest = {}
        for r in rows:
            latest[r["suite"]] = max(latest.get(r["suite"], ""), r["run_id"])
        return [r for r in rows if r["run_id"] == latest.get(r["suite"])], ",".join(sorted(set(latest.values())))
    return [r for r in rows if r["run_id"] == run_id], run_id


def _legend(ax, size=8):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size, ncol=2 if len(ax.get_legend_handles_labels()[0]) > 8 else 1)


def base_name(provider):
    return provider.split("@")[0]


def plot_layer(rows, out, plt):
    rows = [r for r in rows if r["suite"] == "layer" and _f(r["ms"]) is not None]
    if not rows:
        return []
    shapes = list(OrderedDict.fromkeys(r["case"] for r in rows))
    # matched density only: the first k seen per (shape, provider) is the LoRA-matched one
    first = OrderedDict()
    for r in rows:
        key = (r["case"], base_name(r["provider"]))
        if key not in first and not base_name(r["provider"]).startswith("gemm-"):
            first[key] = r
    provs = list(OrderedDict.fromkeys(p for _, p in first))
    made = []
    for metric, fname, ylabel in (("ms", "layer_time.png", "ms per training step"),
                                  ("peak_mib", "layer_memory.png", "peak extra MiB")):
        fig, axes = plt.subplots(1, 2 if metric == "ms" else 1, figsize=(14 if metric == "ms" else 9, 5),
                                 squeeze=False)
        width = 0.8 / max(1, len(provs))
        for si, shape in enumerate(shapes):
            for pi, p in enumerate(provs):
                r = first.get((shape, p))
                if r is None:
                    continue
                v = _f(r[metric])
                if v is not None:
                    axes[0][0].bar(si + pi * width, v, width, color=plt.cm.tab20(pi % 20), label=p if si == 0 else None)
                if metric == "ms" and _f(r["x_ref"]) is not None:
                    axes[0][1].bar(si + pi * width, _f(r["x_ref"]), width, color=plt.cm.tab20(pi % 20))
        for ax, lab in zip(axes[0], (ylabel, "x frozen")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels(shapes)
            ax.set_ylabel(lab)
            ax.grid(axis="y", alpha=0.3)
        if metric == "ms":
            axes[0][1].axhline(1.0, color="k", lw=0.8)
        _legend(axes[0][0], 7)
        fig.suptitle(f"one linear layer, training step ({rows[0]['gpu']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        made.append(fname)
    dens = [r for r in rows if r["density"] not in ("", None) and _f(r["density"])]
    if dens:
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for si, shape in enumerate(shapes):
            ax = axes[0][si]
            series = defaultdict(list)
            for r in dens:
                if r["case"] == shape:
                    series[base_name(r["provider"])].append((_f(r["density"]), _f(r["ms"])))
            for pi, (p, pts) in enumerate(sorted(series.items())):
                pts.sort(key=lambda t: t[0])
                ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], "o-", label=p, color=f"C{pi % 10}")
            ax.set_xscale("log")
            ax.set_xlabel("density %")
            ax.set_ylabel("ms")
            ax.set_title(shape)
            ax.grid(alpha=0.3)
            _legend(ax, 7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "layer_density.png"), dpi=110)
        plt.close(fig)
        made.append("layer_density.png")
    return made


def plot_memory(rows, out, plt):
    rows = [r for r in rows if r["suite"] == "memory" and r["case"] != "fit"]
    made = []
    for sweep, fname, xkey, xlabel in (("ksweep", "memory_k.png", "k", "deltas (all layers)"),
                                       ("size", "memory_size.png", "weights_per_layer", "out x in per layer")):
        sel = [r for r in rows if r["case"].startswith(sweep) and base_name(r["provider"]) != "frozen"]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        series = defaultdict(list)
        for r in sel:
            ex = _extra(r)
            x = _f(r["k"]) if xkey == "k" else _f(ex.get("weights_per_layer"))
            s, p = _f(ex.get("static_extra_mib")), _f(ex.get("peak_extra_mib"))
            if x is not None:
                series[base_name(r["provider"])].append((x, s, p))
        for pi, (prov, pts) in enumerate(sorted(series.items())):
            pts.sort(key=lambda t: t[0])
            for ax, idx in ((axes[0], 1), (axes[1], 2)):
                ys = [(v[0], v[idx]) for v in pts if v[idx] is not None]
                if ys:
                    ax.plot([x for x, _ in ys], [y for _, y in ys], "o-", color=f"C{pi % 10}", label=prov)
        for ax, title in zip(axes, ("static extra over frozen", "peak extra over frozen")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("MiB")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            _legend(ax, 8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        made.append(fname)
    timed = [r for r in rows if r["case"].startswith("ksweep") and _f(r["ms"]) is not None
             and base_name(r["provider"]) != "frozen"]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        for r in timed:
            series[base_name(r["provider"])].append((_f(r["density"]), _f(r["ms"])))
        frozen = [_f(r["ms"]) for r in rows if r["case"].startswith("ksweep") and r["provider"] == "frozen"]
        for pi, (p, pts) in enumerate(sorted(series.items())):
            pts.sort(key=lambda t: t[0])
            ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], "o-", color=f"C{pi % 10}", label=p)
        if frozen and frozen[0]:
            ax.axhline(frozen[0], color="k", lw=0.8, label="frozen")
        ax.set_xscale("log")
        ax.set_xlabel("density %")
        ax.set_ylabel("ms per step (stack)")
        ax.grid(alpha=0.3)
        _legend(ax, 8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "memory_time.png"), dpi=110)
        plt.close(fig)
        made.append("memory_time.png")
    return made


def plot_e2e(rows, out, plt):
    rows = [r for r in rows if r["suite"] == "e2e" and _f(r["ms"]) is not None]
    if not rows:
        return []
    made = []
    models = list(OrderedDict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    for mi, model in enumerate(models):
        sel = [r for r in rows if r["case"] == model]
        names = [r["provider"] for r in sel]
        avg = [_f(r["ms"]) for r in sel]
        steady = [_f(_extra(r).get("ms_steady")) or _f(r["ms"]) for r in sel]
        peak = [(_f(r["peak_mib"]) or 0) / 1024 for r in sel]
        xs = range(len(sel))
        axes[mi][0].bar([x - 0.2 for x in xs], avg, 0.4, label="average (with index updates)")
        axes[mi][0].bar([x + 0.2 for x in xs], steady, 0.4, label="steps without updates")
        axes[mi][0].set_ylabel("ms per step")
        axes[mi][1].bar(list(xs), peak, 0.6, color="C2")
        axes[mi][1].set_ylabel("peak GiB")
        for ax in axes[mi]:
            ax.set_xticks(list(xs))
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.set_title(f"{model} ({sel[0]['gpu']})")
        _legend(axes[mi][0], 8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "e2e.png"), dpi=110)
    plt.close(fig)
    made.append("e2e.png")
    spiel = [r for r in rows if r["provider"].startswith("spiel") and _extra(r).get("step_ms")]
    if spiel:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for i, r in enumerate(spiel):
            ex = _extra(r)
            ms = ex["step_ms"]
            flags = ex.get("update_flags") or [False] * len(ms)
            ax.plot(range(len(ms)), ms, "-", color=f"C{i}", label=f"{r['case']} {r['provider']}")
            ax.plot([j for j, f in enumerate(flags) if f], [m for m, f in zip(ms, flags) if f], "x", color=f"C{i}")
        ax.set_xlabel("step in the measured window (x: update steps)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        _legend(ax, 8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "e2e_steps.png"), dpi=110)
        plt.close(fig)
        made.append("e2e_steps.png")
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=None, help="default: $SPIEL_BENCH_CSV or benchmarks/results/results.csv")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: plots/ beside the CSV)")
    p.add_argument("--run-id", default="latest", help="'latest' (default), 'all' or a run id")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import harness

    path = harness.csv_path(args.csv)
    if not os.path.exists(path):
        print(f"note: no CSV at {path}: nothing to plot")
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"note: matplotlib not importable ({exc}): no plots")
        return 0
    rows, rid = load(path, args.run_id)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "plots")
    os.makedirs(out, exist_ok=True)
    made = []
    for fn in (plot_layer, plot_memory, plot_e2e):
        try:
            made += fn(rows, out, plt)
        except Exception as exc:  # one broken plot never stops the others
            print(f"note: {fn.__name__} failed: {type(exc).__name__}: {exc}")
    print(f"plots for run {rid}: " + (", ".join(os.path.join(out, m) for m in made) if made else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
