"""The results table (markdown + json) and the loss-curve PNG written into ``--out``."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Dict, List, Sequence

from .train import RunResult

TABLE_MD = "results.md"
TABLE_JSON = "results.json"
CURVES_PNG = "loss_curves.png"


def _mean_std(xs: Sequence[float]):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(xs: Sequence[float], digits: int, scale: float = 1.0) -> str:
    m, s = _mean_std([x * scale for x in xs])
    return f"{m:.{digits}f}" if len(xs) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(results: List[RunResult]) -> List[Dict[str, object]]:
    """One row per method (in first-seen order): means (and sample std over seeds) of the metrics."""
    rows = []
    methods = list(dict.fromkeys(r.method for r in results))
    for method in methods:
        rs = [r for r in results if r.method == method]
        row = {"method": method, "seeds": [r.seed for r in rs], "lr": rs[0].lr, "steps": rs[0].steps}
        for key in ("train_loss", "eval_loss", "eval_accuracy", "train_time_s", "peak_memory_mib"):
            m, s = _mean_std([getattr(r, key) for r in rs])
            row[key] = m
            row[key + "_std"] = s
        row["trainable_params"] = rs[0].trainable_params
        row["adapter_params"] = rs[0].adapter_params
        row["memory_kind"] = rs[0].memory_kind
        rows.append(row)
    return rows


def markdown_table(results: List[RunResult], kind: str) -> str:
    acc_name = "held-out acc (%)" if kind == "classification" else "held-out token acc (%)"
    mem_kind = results[0].memory_kind if results else ""
    lines = [f"| method | lr | train loss | held-out loss | {acc_name} | trainable params | time (s) | "
             f"peak mem (MiB, {mem_kind}) |",
             "|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r.method for r in results))
    for method in methods:
        rs = [r for r in results if r.method == method]
        lines.append(
            f"| {method} | {rs[0].lr:g} | {_fmt([r.train_loss for r in rs], 3)} | "
            f"{_fmt([r.eval_loss for r in rs], 3)} | {_fmt([r.eval_accuracy for r in rs], 1, 100)} | "
            f"{rs[0].trainable_params:,} | {_fmt([r.train_time_s for r in rs], 0)} | "
            f"{_fmt([r.peak_memory_mib for r in rs], 0)} |")
    return "\n".join(lines)


def write_results(out_dir: str, results: List[RunResult], meta: Dict[str, object], kind: str) -> Dict[str, str]:
    """Writes results.md, results.json and loss_curves.png into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(results, kind)
    seeds = sorted({r.seed for r in results})
    header = ["# spiel.finetune results", "",
              f"command: `{meta.get('command', '')}`", "",
              f"model: {meta.get('model', '')}  ",
              f"data: {meta.get('data', '')} ({meta.get('num_train', '?')} train / "
              f"{meta.get('num_test', '?')} {meta.get('eval_split', 'test')} examples)  ",
              f"steps: {results[0].steps if results else '?'}, batch size {meta.get('batch_size', '?')}, "
              f"seeds {seeds} (mean ± std over seeds)  ",
              f"device: {meta.get('device', '')}", ""]
    if meta.get("notes"):
        header += [str(meta["notes"]), ""]
    paths = {"markdown": os.path.join(out_dir, TABLE_MD), "json": os.path.join(out_dir, TABLE_JSON),
             "png": os.path.join(out_dir, CURVES_PNG)}
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(header) + table + "\n")
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "summary": summarize(results),
                   "runs": [asdict(r) for r in results]}, f, indent=1)
    plot_curves(results, paths["png"])
    return paths


def _smooth(xs: Sequence[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(results: List[RunResult], path: str) -> None:
    """Training loss (moving average; mean over seeds) per method, and the held-out loss points."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    methods = list(dict.fromkeys(r.method for r in results))
    for i, method in enumerate(methods):
        rs = [r for r in results if r.method == method]
        n = min(len(r.losses) for r in rs)
        if n == 0:
            continue
        mean = [sum(r.losses[t] for r in rs) / len(rs) for t in range(n)]
        window = max(1, n // 25)
        color = f"C{i}"
        ax.plot(range(1, n + 1), mean, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(range(1, n + 1), _smooth(mean, window), color=color, label=f"{method} (train)")
        points: Dict[int, List[float]] = {}
        for r in rs:
            for step, loss in r.eval_curve:
                points.setdefault(step, []).append(loss)
        if points:
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], color=color, linestyle="--",
                    marker="o", markersize=3, label=f"{method} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    seeds = sorted({r.seed for r in results})
    ax.set_title(f"spiel.finetune loss curves (mean over seeds {seeds})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
