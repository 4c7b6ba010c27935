"""CPU smoke tests of the benchmark scripts (tiny shapes): they run, write their CSV rows, and the numbers
they derive (LoRA-matched counts, update-step detection, bytes per delta, target checks) are right."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _imports(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


HAS_SPIEL_TRAINING = all(_has(m) for m in ("spiel.nn", "spiel.optim", "spiel.scheduler"))
HAS_PEFT = _imports("peft")
HAS_BNB = _imports("bitsandbytes")
HAS_TRANSFORMERS = _imports("transformers")


def _run(script, *args, timeout=600):
    env = dict(os.environ, SPIEL_BENCH_RUN_ID="smoke", PYTHONWARNINGS="ignore")
    env.pop("SPIEL_BENCH_CSV", None)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _by_provider(rows):
    return {r["provider"]: r for r in rows}


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_bench_e2e_tiny_cpu(tmp_path):
    out_csv = tmp_path / "e2e.csv"
    providers = ["frozen", "published", "spiel-ag", "spiel-ag-merged", "spiel-ma", "spiel-ma-bf16", "lora", "spiel-nf4",
                 "spiel-nf4-ma-bf16"]
    stdout = _run("bench_e2e.py", "--model", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1",
                  "--reselection-steps", "2", "--accumulation-steps", "1", "--providers", ",".join(providers),
                  "--csv", str(out_csv))
    assert "targets (same run)" in stdout
    rows = _by_provider(_rows(out_csv))
    assert set(providers) <= set(rows)
    # tiny: hidden 64, intermediate 176, 2 layers, kv dim 32, rank 4 -> 2 * 4 * (2*128 + 2*96 + 3*240)
    matched = 2 * 4 * (2 * 128 + 2 * 96 + 3 * 240)
    expect_ok = {"frozen": True, "published": True, "lora": HAS_PEFT,
                 "spiel-ag": HAS_SPIEL_TRAINING, "spiel-ag-merged": HAS_SPIEL_TRAINING, "spiel-ma": HAS_SPIEL_TRAINING,
                 "spiel-ma-bf16": HAS_SPIEL_TRAINING, "spiel-nf4": HAS_SPIEL_TRAINING and HAS_BNB,
                 "spiel-nf4-ma-bf16": HAS_SPIEL_TRAINING and HAS_BNB}
    for name, ok in expect_ok.items():
        row = rows[name]
        if not ok:
            assert row["note"].startswith("skipped"), row
            continue
        assert row["ms"] and float(row["ms"]) > 0, row
        assert not row["note"].startswith(("failed", "skipped")), row
        extra = json.loads(row["extra"])
        if name != "frozen":
            assert int(extra["trainable"]) == matched, (name, extra["trainable"])
        if name.startswith("spiel"):
            # S=2, gamma=1: every window holds scheduler activity, and the detection must see it
            assert extra["n_update"] >= 1, (name, extra)
    assert float(rows["frozen"]["x_ref"]) == pytest.approx(1.0)


def test_bench_layer_small_cpu(tmp_path):
    out_csv = tmp_path / "layer.csv"
    providers = ["frozen", "full", "published", "spiel", "spiel-torch", "spiel-cuda", "spiel-merged", "lora",
                 "spiel-nf4"]
    stdout = _run("bench_layer.py", "--small", "--device", "cpu", "--shapes", "64x64,96x64", "--rep-ms", "5",
                  "--providers", ",".join(providers), "--csv", str(out_csv))
    assert "bench_layer" in stdout
    rows = _rows(out_csv)
    names = {r["provider"].split("@")[0] for r in rows}
    assert set(providers) <= names
    for r in rows:
        name = r["provider"].split("@")[0]
        if name == "spiel-cuda":
            assert r["note"].startswith("skipped"), r  # no GPU here
        else:
            assert r["ms"] and float(r["ms"]) > 0, r
    # sparse providers at the LoRA-matched k and at 0.1% (at least 1)
    ks = sorted({int(r["k"]) for r in rows if r["provider"].startswith("spiel@") and r["case"] == "64x64"})
    assert ks == [4, 4 * (64 + 64)]
    frozen = [r for r in rows if r["provider"] == "frozen"]
    assert all(float(r["x_ref"]) == pytest.approx(1.0) for r in frozen)


def test_bench_memory_small_cpu(tmp_path):
    out_csv = tmp_path / "memory.csv"
    _run("bench_memory.py", "--small", "--device", "cpu", "--no-time", "--densities", "0.01,0.04",
         "--dims", "32,64", "--providers", "published" + (",spiel-ag" if HAS_SPIEL_TRAINING else ""),
         "--csv", str(out_csv))
    rows = _rows(out_csv)
    fits = {r["provider"]: json.loads(r["extra"]) for r in rows if r["case"] == "fit"}
    # published: int64 index (8) + bf16 delta (2) + AdamW bf16 exp_avg and exp_avg_sq (2 + 2) per delta
    assert fits["published"]["bpd_static"] == pytest.approx(14.0, abs=0.5)
    assert abs(fits["published"]["bpw_static"]) < 0.05
    if HAS_SPIEL_TRAINING:
        assert 8.0 <= fits["spiel-ag"]["bpd_static"] <= 64.0


def test_plot_and_helpers(tmp_path):
    import harness
    import bench_e2e

    path = tmp_path / "r.csv"
    harness.append_rows(str(path), [{"run_id": "x", "suite": "e2e", "case": "tiny", "provider": "frozen",
                                     "ms": 10.0, "peak_mib": 1024.0, "extra": {"ms_steady": 10.0}},
                                    {"run_id": "x", "suite": "e2e", "case": "tiny", "provider": "spiel-ag",
                                     "ms": 12.0, "peak_mib": 2048.0,
                                     "extra": {"step_ms": [11.0, 13.0], "update_flags": [False, True]}}])
    rows = harness.read_rows(str(path))
    assert [r["provider"] for r in rows] == ["frozen", "spiel-ag"]
    assert list(rows[0]) == harness.CSV_COLUMNS
    q = harness._quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert q["ms"] == 3.0 and q["ms_p20"] == pytest.approx(1.8) and q["ms_p80"] == pytest.approx(4.2)
    checks = {c[0]: c[3] for c in bench_e2e.check_targets({
        "spiel-ag": {"ms_avg": 80.0, "peak_gib": 15.0, "n_update": 12, "update_overhead": 0.02},
        "published": {"ms_avg": 100.0, "peak_gib": 17.0},
        "lora": {"ms_avg": 100.0, "peak_gib": 15.8},
        "spiel-ma": {"ms_avg": 90.0, "peak_gib": 15.5, "n_update": 2, "update_overhead": 0.05},
        "frozen": {"ms_avg": 50.0, "peak_gib": 14.0}})}
    assert checks["spiel-ag / published (step)"] == "PASS"
    assert checks["spiel-ag / lora (step)"] == "FAIL"
    assert checks["spiel-ag peak - lora peak"] == "PASS"
    assert checks["spiel-ma peak - frozen peak"] == "FAIL"
    assert checks["spiel-ma index-update overhead"] == "FAIL"
    assert checks["spiel-nf4 / qlora (step)"] == "n/a"
    if _imports("matplotlib"):
        _run("plot.py", "--csv", str(path), "--out", str(tmp_path / "plots"), "--run-id", "all")
        assert (tmp_path / "plots" / "e2e.png").exists()
        assert (tmp_path / "plots" / "e2e_steps.png").exists()


def test_paired_ratios_cpu():
    """Interleaved timings: a provider doing half the baseline's work is ~2x; the baseline is not a row."""
    import harness

    def work(n):
        return lambda: sum(range(n))

    res = harness.paired_ratios({"base": work(40000), "half": work(20000), "same": work(40000)}, "base",
                                torch.device("cpu"), rounds=3, rep_ms=5)
    assert set(res) == {"half", "same"}
    assert 1.4 < res["half"]["x"] < 2.8 and res["half"]["x_min"] <= res["half"]["x"] <= res["half"]["x_max"]
    assert 0.7 < res["same"]["x"] < 1.4
    with pytest.raises(ValueError, match="baseline"):
        harness.paired_ratios({"a": work(10)}, "b", torch.device("cpu"))


def test_bench_select_small_cpu(tmp_path):
    out_csv = tmp_path / "select.csv"
    stdout = _run("bench_select.py", "--small", "--device", "cpu", "--csv", str(out_csv))
    assert "AG probe on one layer" in stdout
    rows = _rows(out_csv)
    timed = {r["provider"] for r in rows if r["ms"] and float(r["ms"]) > 0}
    assert timed == {"gemm fp32 out", "probe torch", "probe 2^24 torch", "select torch", "select torch bf16",
                     "one pass (amax)", "one pass (amax) bf16", "torch.topk"}, rows
    # no CUDA here: the cuda rows are recorded as skipped, with the reason
    assert all("unavailable" in r["note"] for r in rows if r["provider"] not in timed), rows


def test_bench_replace_small_cpu(tmp_path):
    out_csv = tmp_path / "replace.csv"
    stdout = _run("bench_replace.py", "--small", "--device", "cpu", "--csv", str(out_csv))
    assert "drop + regrow of one update batch" in stdout
    rows = _rows(out_csv)
    timed = {r["provider"] for r in rows if r["ms"] and float(r["ms"]) > 0}
    assert timed == {"copy 20 B/entry", "op torch"}, rows
    assert all("unavailable" in r["note"] for r in rows if r["provider"] not in timed), rows


def test_bench_optim_small_cpu(tmp_path):
    out_csv = tmp_path / "optim.csv"
    stdout = _run("bench_optim.py", "--small", "--device", "cpu", "--csv", str(out_csv))
    assert "SparseAdamW step, 7B layout" in stdout
    rows = _rows(out_csv)
    timed = {r["provider"] for r in rows if r["ms"]}
    assert {"copy", "foreach"} <= timed, rows
    assert all("host" in r["note"] for r in rows if r["provider"] == "foreach"), rows


@pytest.mark.skipif(not (HAS_TRANSFORMERS and HAS_SPIEL_TRAINING), reason="transformers not installed")
def test_profile_e2e_update_phases_cpu():
    stdout = _run("profile_e2e.py", "--provider", "spiel-ag", "--model", "tiny", "--device", "cpu",
                  "--reselection-steps", "4", "--accumulation-steps", "2", "--profile-update", "--host")
    assert "index-update steps profiled" in stdout
    for phase in ("probe", "install", "update", "apply"):  # no harvest: 1 candidate per slot is deferred
        assert f"spiel.scheduler.{phase} " in stdout, phase
    # --host: the enqueue time of each phase of a plain step and a cProfile naming spiel's layer
    assert "== host: ms per plain step" in stdout
    for phase in ("forward", "backward", "optimizer", "enqueue total", "wall (drained)"):
        assert f"   {phase}" in stdout, phase
    assert "cProfile of two plain steps" in stdout and "spiel/ops/linear.py" in stdout
    # --host with --profile-update: the probe step and the reselection step, each timed and profiled
    for kind in ("probe", "update"):
        assert f"== host, {kind} step: enqueue" in stdout, kind
        assert f"== host, {kind} step: cProfile" in stdout, kind
    assert "_select.py" in stdout.split("== host, probe step: cProfile")[1].split("== host, update step")[0]


def test_bench_outer_small_cpu(tmp_path):
    out_csv = tmp_path / "outer.csv"
    stdout = _run("bench_outer.py", "--small", "--device", "cpu", "--csv", str(out_csv))
    assert "threshold multisection of one MA update batch" in stdout
    rows = _rows(out_csv)
    timed = {r["provider"] for r in rows if r["ms"] and float(r["ms"]) > 0}
    assert timed == {"op torch S=63"}, rows
    assert all("unavailable" in r["note"] for r in rows if r["provider"] not in timed), rows


@pytest.mark.skipif(not (HAS_TRANSFORMERS and HAS_SPIEL_TRAINING), reason="transformers not installed")
def test_bench_paired_tiny_cpu(tmp_path):
    out_csv = tmp_path / "paired.csv"
    stdout = _run("bench_paired.py", "--model", "tiny", "--device", "cpu", "--rounds", "2", "--window", "4",
                  "--reselection-steps", "4", "--accumulation-steps", "1",
                  "--providers", "frozen,published,spiel-ag-merged", "--csv", str(out_csv))
    assert "paired ratios per round" in stdout
    rows = _by_provider(_rows(out_csv))
    assert set(rows) == {"frozen", "published", "spiel-ag-merged"}
    for name, row in rows.items():
        extra = json.loads(row["extra"])
        assert len(extra["window_ms"]) == 2 and all(v > 0 for v in extra["window_ms"]), (name, extra)
        assert float(row["ms"]) == pytest.approx(sum(extra["window_ms"]) / 2, rel=1e-3)  # the median of two
    assert float(rows["frozen"]["x_ref"] or 1.0) == pytest.approx(1.0)
    assert float(rows["spiel-ag-merged"]["x_ref"]) > 0
    assert "spiel-ag-merged / published" in stdout
    with pytest.raises(AssertionError, match="at least two"):
        _run("bench_paired.py", "--model", "tiny", "--device", "cpu", "--providers", "frozen")
