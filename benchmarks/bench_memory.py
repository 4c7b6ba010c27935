"""Memory of sparse fine-tuning over a frozen model: bytes per delta, and independence from out x in.

    python benchmarks/bench_memory.py                       # H100, ~30 s
    python benchmarks/bench_memory.py --small --device cpu  # CPU smoke test (memory columns empty on CPU)

A stack of L linear layers (bias-free, bf16) trained on T tokens: x -> layer_1 -> ... -> layer_L, one
training step = forward, backward, optimizer step, zero_grad. For each provider, after two warm-up steps
(optimizer state allocated):
  static extra = allocated memory between steps minus the frozen stack's (deltas, indices, optimizer state);
                 on CPU the bytes of the parameters, buffers and optimizer state instead
  peak extra   = peak of one step minus the frozen stack's peak (adds transients: merged weights, sddmm)
Sweeps:
  k sweep     fixed model (L layers of d x d), density per layer 0.25% .. 4%: extra vs k, fit bytes/delta
  size sweep  fixed k per layer, d from 1024 to 8192: extra vs out*in (the fit's slope per weight element
              should be ~0 for the static memory; the peak may hold one merged weight of one layer at a time)
Providers: spiel-ag (spiel.nn.inject + SparseAdamW), spiel-ma (SM3), published (int64 indices, bf16
deltas, torch AdamW), frozen (the reference).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import ContextLost, Runner, Skip  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import providers as P  # noqa: E402

PROVIDERS = ["frozen", "spiel-ag", "spiel-ma", "published"]
MIB = 2**20


def build(provider: str, d_out: int, d_in: int, layers: int, k: int, device, dtype=torch.bfloat16):
    """(model, optimizer or None) for one provider: a stack d_in -> d_out -> d_out ... of bias-free linears."""
    mods = []
    for i in range(layers):
        lin = nn.Linear(d_in if i == 0 else d_out, d_out, bias=False, device=device, dtype=dtype)
        lin.weight.requires_grad_(False)
        mods.append(lin)
    model = nn.Sequential(*mods)
    if provider == "frozen":
        return model, None
    if provider == "published":
        gen = torch.Generator(device=device).manual_seed(1)
        for i, lin in enumerate(mods):
            model[i] = P.PublishedSpielLinear(lin, k, dtype=dtype, generator=gen)
        values = [m.values for m in model]
        kw = {"fused": True} if device.type == "cuda" else {}
        return model, torch.optim.AdamW(values, lr=1e-4, **kw)
    snn = P.import_optional("spiel.nn")
    optim = P.import_optional("spiel.optim")
    snn.inject(model, target_modules=None, num_deltas=k)
    opt = optim.SparseAdamW(model, lr=1e-4) if provider == "spiel-ag" else optim.SM3(model, lr=1e-4)
    return model, opt


def tensor_bytes(model, opt) -> int:
    """Bytes of the distinct storages of the model's parameters/buffers and the optimizer state (CPU stand-in
    for memory_allocated: the persistent memory only)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                st = t.untyped_storage()
                key = st.data_ptr()
                size = st.nbytes()
            except Exception:
                key, size = id(t), t.numel() * t.element_size()
            if key not in seen:
                seen.add(key)
                total += size

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    if opt is not None:
        for state in opt.state.values():
            for v in (state.values() if isinstance(state, dict) else [state]):
                add(v)
    return total


def measure(provider: str, d_out: int, d_in: int, layers: int, k: int, tokens: int, device, time_it: bool):
    """Static and peak bytes (above what existed before the model was built) of one provider, and step ms."""
    harness.cleanup(device)
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else 0
    model, opt = build(provider, d_out, d_in, layers, k, device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    gy = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16, generator=g)

    def step():
        y = model(x)
        y.backward(gy)
        x.grad = None
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    harness.sync(device)
    res = {"static": float("nan"), "peak": float("nan"), "ms": None}
    if not cuda:
        res["static"] = float(tensor_bytes(model, opt) + x.numel() * x.element_size() * 2)
    if cuda:
        harness.cleanup(device)
        res["static"] = torch.cuda.memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        res["peak"] = torch.cuda.max_memory_allocated(device) - base
    if time_it:
        res.update(harness.time_fn(step, device, warmup_ms=10, rep_ms=40))
    del model, opt, x, gy
    harness.cleanup(device)
    return res


def fit(xs, ys):
    """Least squares y = a*x + b; returns (a, b) or (nan, nan)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
    if len(pts) < 2:
        return float("nan"), float("nan")
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return float("nan"), my
    a = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return a, my - a * mx


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.common_args(p)
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=None, help="T (default 2048, --small 32)")
    p.add_argument("--dim", type=int, default=None, help="d of the k sweep (default 4096, --small 64)")
    p.add_argument("--densities", default="0.0025,0.005,0.01,0.02,0.04")
    p.add_argument("--dims", default=None, help="d of the size sweep (default 1024,2048,4096,8192; --small 32,64,96)")
    p.add_argument("--fixed-k", type=int, default=None, help="k per layer of the size sweep (default 65536)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--no-time", action="store_true", help="skip the step timings")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.pick_device(args.device)
    tokens = args.tokens or (32 if args.small else 2048)
    d = args.dim or (64 if args.small else 4096)
    dims = [int(v) for v in (args.dims or ("32,64,96" if args.small else "1024,2048,4096,8192")).split(",")]
    fixed_k = args.fixed_k or (256 if args.small else 65536)
    densities = [float(v) for v in args.densities.split(",")]
    provs = [p.strip() for p in args.providers.split(",") if p.strip()]
    if "frozen" not in provs:
        provs.insert(0, "frozen")
    L = args.layers

    jobs = []  # (case, provider, d_out, d_in, k, sweep)
    for dens in densities:
        k = max(1, round(dens * d * d))
        for p in provs:
            if p == "frozen" and dens != densities[0]:
                continue
            jobs.append((f"ksweep-d{d}", p, d, d, k, "k"))
    for dd in dims:
        k = min(fixed_k, dd * dd)
        for p in provs:
            jobs.append((f"size-d{dd}", p, dd, dd, k, "size"))

    def body(runner: Runner):
        harness.print_header("bench_memory", device, runner.ceil)
        print(f"   stack of {L} bias-free bf16 linears, T={tokens}; k sweep at d={d}, densities {densities}; "
              f"size sweep d={dims} at k={fixed_k} per layer", flush=True)
        frozen = {}
        skipped = {}
        for case, p, d_out, d_in, k, sweep in jobs:
            key = f"{case}/{p}@{k}"
            if key in runner.done:
                continue
            if p in skipped:
                continue
            row = {"case": case, "provider": p if p == "frozen" else f"{p}@{k}", "shape": f"{d_out}x{d_in}",
                   "k": 0 if p == "frozen" else k * L, "density": 0.0 if p == "frozen" else k / (d_out * d_in)}
            try:
                res = measure(p, d_out, d_in, L, k, tokens, device, not args.no_time)
            except Skip as exc:
                skipped[p] = str(exc)
                row["note"] = f"skipped: {exc}"
                res = None
            except Exception as exc:
                row["note"] = f"failed: {harness.short_error(exc)}"
                res = None
            alive = harness.context_alive(device)
            if res is not None:
                fkey = (d_out, d_in)
                if p == "frozen":
                    frozen[fkey] = res
                ref = frozen.get(fkey) or next((r["_res"] for r in runner.rows if r.get("shape") == row["shape"]
                                                and r.get("provider") == "frozen" and r.get("_res")), None)
                static_extra = res["static"] - ref["static"] if ref else float("nan")
                peak_extra = res["peak"] - ref["peak"] if ref else float("nan")
                row.update({"ms": res.get("ms"), "ms_p20": res.get("ms_p20"), "ms_p80": res.get("ms_p80"),
                            "peak_mib": peak_extra / MIB,
                            "extra": {"sweep": sweep, "layers": L, "tokens": tokens, "k_per_layer": k,
                                      "static_extra_mib": static_extra / MIB, "peak_extra_mib": peak_extra / MIB,
                                      "static_mib": res["static"] / MIB, "peak_total_mib": res["peak"] / MIB,
                                      "weights_per_layer": d_out * d_in}})
                if ref and ref.get("ms") and res.get("ms"):
                    row["x_ref"] = res["ms"] / ref["ms"]
            full = runner.record(row)
            full["_res"] = res
            runner.done.add(key)
            ex = row.get("extra", {})
            print(f"  {case:<12} {p:<9} k/layer={k:<8} static+{harness.fmt(ex.get('static_extra_mib'))} MiB "
                  f"peak+{harness.fmt(ex.get('peak_extra_mib'))} MiB  {harness.fmt(row.get('ms'))} ms "
                  f"{row.get('note') or ''}", flush=True)
            if not alive:
                raise ContextLost(key)

    def summary(runner: Runner):
        rows = [r for r in runner.rows if r.get("case")]
        for r in rows:
            ex = r.get("extra") if isinstance(r.get("extra"), dict) else {}
            r["_static"] = ex.get("static_extra_mib")
            r["_peak"] = ex.get("peak_extra_mib")
        harness.print_table(rows, [
            ("sweep", "case"), ("provider", lambda r: str(r["provider"]).split("@")[0]),
            ("layer", "shape"), ("k total", "k"),
            ("density", lambda r: f"{float(r['density']):.2%}" if r.get("density") not in ("", None) else "-"),
            ("static+ MiB", "_static"), ("peak+ MiB", "_peak"), ("ms", "ms"), ("x frozen", "x_ref"),
            ("note", lambda r: harness.clip(r.get("note") or "", 50)),
        ], title=f"bench_memory: extra memory over a frozen stack of {L} linears, T={tokens}")
        fits = []
        for p in provs:
            if p == "frozen":
                continue
            ks = [r for r in rows if r["provider"].startswith(p + "@") and r["case"].startswith("ksweep")
                  and r["_static"] is not None]
            ss = [r for r in rows if r["provider"].startswith(p + "@") and r["case"].startswith("size")
                  and r["_static"] is not None]
            a_s, b_s = fit([r["k"] for r in ks], [r["_static"] * MIB for r in ks])
            a_p, b_p = fit([r["k"] for r in ks], [r["_peak"] * MIB for r in ks])
            w_s, c_s = fit([r["extra"]["weights_per_layer"] for r in ss], [r["_static"] * MIB for r in ss])
            w_p, c_p = fit([r["extra"]["weights_per_layer"] for r in ss], [r["_peak"] * MIB for r in ss])
            fits.append({"provider": p, "bpd_static": a_s, "b_static": b_s / MIB if math.isfinite(b_s) else None,
                         "bpd_peak": a_p, "b_peak": b_p / MIB if math.isfinite(b_p) else None,
                         "bpw_static": w_s, "bpw_peak": w_p})
            runner.record({"case": "fit", "provider": p, "note": "bytes per delta / per weight element",
                           "extra": {kk: v for kk, v in fits[-1].items() if kk != "provider"}})
        if fits:
            harness.print_table(fits, [
                ("provider", "provider"), ("B/delta static", "bpd_static"), ("fixed static MiB", "b_static"),
                ("B/delta peak", "bpd_peak"), ("fixed peak MiB", "b_peak"),
                ("static B per out*in", "bpw_static"), ("peak B per out*in", "bpw_peak"),
            ], title="fits: extra = a*k + b (k sweep), extra = c*out*in + e (size sweep, fixed k)")

    return harness.guarded_main(lambda: Runner("memory", device, args.csv, ceilings=False), body, summary)


if __name__ == "__main__":
    sys.exit(main())
