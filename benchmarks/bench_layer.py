"""One linear layer, one training step (forward + backward), T tokens, bf16: spiel against the baselines.

    python benchmarks/bench_layer.py                      # H100: 3 shapes x all providers, ~1 min
    python benchmarks/bench_layer.py --small --device cpu # CPU smoke test, seconds

Providers (each a factory returning one step; inputs rotated over 3 buffers):
  gemm-fwd / gemm-dX / gemm-dW   the three bare GEMMs of a step (floors)
  frozen         fwd GEMM + dX GEMM (x requires grad, W frozen)
  full           full fine-tuning: fwd + dX + dW
  published      published SpIEL math: clone W + scatter_add, GEMM; backward clone + scatter again, dX GEMM,
                 dense dW GEMM, gather at int64 indices (deltas bf16)
  spiel          spiel.ops.sparse_delta_linear, backend "auto"; spiel-torch / -triton / -cuda force a backend
  spiel-fp8      spiel's fp8 option, when spiel exposes one
  spiel-merged   spiel.nn.SparseDeltaLinear trained merged (merge_(train=True): W + delta kept in the weight,
                 each forward rewrites the k merged entries; no merge kernel), backend "auto"
  spiel-nf4      spiel on spiel's own NF4 weight (blocksize 64, double quant), backend "auto"
  lora           bf16 LoRA: x@W^T + (x@A^T)@B^T*scale, A and B trainable bf16
  peft-lora      peft LoraConfig(r) on an nn.Linear (peft defaults: fp32 adapters)
  qlora          bitsandbytes Linear4bit (NF4, blocksize 64, double quant, bf16 compute) + bf16 LoRA
  frozen-nf4     bitsandbytes Linear4bit, dX only
  published-nf4  published SpIEL math on the bnb NF4 weight (dequantize_4bit + scatter)
Densities: "r<rank>" = LoRA-matched k = rank*(in+out) and 0.1%.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Runner, Skip  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import providers as P  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMALL_SHAPES = [(64, 64), (96, 64), (64, 96)]
ALL_PROVIDERS = ["frozen", "gemm-fwd", "gemm-dX", "gemm-dW", "full", "published", "spiel", "spiel-torch",
                 "spiel-triton", "spiel-cuda", "spiel-fp8", "spiel-merged", "spiel-nf4", "lora", "peft-lora", "qlora",
                 "frozen-nf4", "published-nf4"]
# providers measured at both densities (the others do not depend on k)
SPARSE = {"published", "spiel", "spiel-torch", "spiel-triton", "spiel-cuda", "spiel-fp8", "spiel-merged", "spiel-nf4",
          "published-nf4"}
LOW_DENSITY_ONLY_FOR = {"published", "spiel", "spiel-torch", "spiel-triton", "spiel-cuda", "spiel-merged"}


class Inputs:
    """``n`` rotated (x, grad_output) pairs so no step reads inputs hot in L2 from the previous one."""

    def __init__(self, tokens, in_f, out_f, device, dtype, n=3, x_grad=True):
        g = torch.Generator(device=device).manual_seed(0)
        self.xs = [torch.randn(tokens, in_f, device=device, dtype=dtype, generator=g).requires_grad_(x_grad)
                   for _ in range(n)]
        self.gys = [torch.randn(tokens, out_f, device=device, dtype=dtype, generator=g) for _ in range(n)]
        self._it = itertools.cycle(range(n))

    def next(self):
        i = next(self._it)
        return self.xs[i], self.gys[i]


def training_step(module_or_fn, params, inputs: Inputs, context=None):
    """One forward + backward: grads for x and ``params`` returned by autograd.grad (nothing accumulates)."""
    params = list(params)

    def step():
        x, gy = inputs.next()
        if context is None:
            y = module_or_fn(x)
            torch.autograd.grad(y, [x] + params, gy)
        else:
            with context():
                y = module_or_fn(x)
                torch.autograd.grad(y, [x] + params, gy)

    return step


def make_factories(out_f, in_f, tokens, k, device, dtype, rank, weight_cache):
    """provider name -> factory for one shape and one k."""

    def weight():
        if "w" not in weight_cache:
            g = torch.Generator(device=device).manual_seed(1)
            weight_cache["w"] = (torch.randn(out_f, in_f, device=device, dtype=dtype, generator=g) * 0.02)
        return weight_cache["w"]

    def inputs(x_grad=True):
        return Inputs(tokens, in_f, out_f, device, dtype, x_grad=x_grad)

    def gemm(which):
        def factory():
            w = weight()
            a = torch.randn(tokens, in_f, device=device, dtype=dtype)
            b = torch.randn(tokens, out_f, device=device, dtype=dtype)
            if which == "fwd":
                return lambda: a @ w.t()
            if which == "dX":
                return lambda: b @ w
            return lambda: b.t() @ a
        return factory

    def frozen():
        w = weight()
        return training_step(lambda x: torch.nn.functional.linear(x, w), [], inputs())

    def full():
        w = weight().clone().requires_grad_(True)
        return training_step(lambda x: torch.nn.functional.linear(x, w), [w], inputs())

    def published():
        base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        base.weight.data = weight()
        mod = P.PublishedSpielLinear(base, k, dtype=dtype)
        return training_step(mod, [mod.values], inputs())

    def spiel_with(backend, **kw):
        def factory():
            ops = P.spiel_ops()
            if backend != "auto":
                info = ops.backend_info()[backend]
                if not info["available"]:
                    raise Skip(f"backend {backend} unavailable: {info['reason'][:80]}")
                needs_cuda = backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1")
                if device.type != "cuda" and needs_cuda:
                    raise Skip(f"backend {backend} needs CUDA tensors")
            note = ""
            if backend != "auto":
                missing = sorted({"merge_delta", "sddmm"} - set(ops.backend_info()[backend]["kernels"]))
                if missing:
                    note = f"{backend} lacks {','.join(missing)}: reference used there"
            mod = P.SpielOpsLinear(weight(), k, **kw)
            ctx = (lambda: ops.use_backend(backend))
            return training_step(mod, [mod.values], inputs(), context=ctx), note
        return factory

    def spiel_fp8():
        opt = P.spiel_fp8_option()
        if opt is None:
            raise Skip("spiel.ops.sparse_delta_linear exposes no fp8 option")
        return spiel_with("auto", **opt)()

    def spiel_merged():
        P.spiel_ops()
        snn = P.import_optional("spiel.nn")
        base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        base.weight.data = weight().clone()  # merge_ writes W + delta in place: keep the shared W intact
        mod = snn.SparseDeltaLinear.from_linear(base, num_deltas=k)
        with torch.no_grad():
            mod.values.normal_().mul_(1e-3)  # not zeros: the merged entries differ from W
        mod.merge_(train=True)
        return training_step(mod, [mod.values], inputs())

    def spiel_nf4():
        ops = P.spiel_ops()
        nf4 = ops.nf4_quantize(weight(), blocksize=64, double_quant=True, dtype=dtype)
        mod = P.SpielOpsLinear(nf4, k)
        return training_step(mod, [mod.values], inputs())

    def lora():
        mod = P.LoRALinear(in_f, out_f, rank, device, dtype, weight=weight())
        return training_step(mod, [mod.A, mod.B], inputs())

    def peft_lora():
        peft = P.peft_module()
        base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        base.weight.data = weight()
        base.weight.requires_grad_(False)
        wrapper = nn.Sequential()
        wrapper.add_module("proj", base)
        model = peft.get_peft_model(wrapper, peft.LoraConfig(r=rank, target_modules=["proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
        return training_step(model, params, inputs())

    def nf4_linear():
        return P.make_linear4bit(weight().clone(), blocksize=64, double_quant=True, compute_dtype=dtype)

    def qlora():
        base = nf4_linear()
        mod = P.LoRALinear(in_f, out_f, rank, device, dtype, base=base)
        return training_step(mod, [mod.A, mod.B], inputs())

    def frozen_nf4():
        base = nf4_linear()
        return training_step(base, [], inputs())

    def published_nf4():
        mod = P.PublishedSpielLinear(nf4_linear(), k, dtype=dtype)
        return training_step(mod, [mod.values], inputs())

    return {
        "gemm-fwd": gemm("fwd"), "gemm-dX": gemm("dX"), "gemm-dW": gemm("dW"),
        "frozen": frozen, "full": full, "published": published,
        "spiel": spiel_with("auto"), "spiel-torch": spiel_with("torch"), "spiel-triton": spiel_with("triton"),
        "spiel-cuda": spiel_with("cuda"), "spiel-fp8": spiel_fp8, "spiel-merged": spiel_merged,
        "spiel-nf4": spiel_nf4,
        "lora": lora, "peft-lora": peft_lora, "qlora": qlora, "frozen-nf4": frozen_nf4,
        "published-nf4": published_nf4,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.common_args(p)
    p.add_argument("--small", action="store_true", help="tiny shapes and tokens (CPU smoke test)")
    p.add_argument("--tokens", type=int, default=None, help="T (default 8192, --small 64)")
    p.add_argument("--shapes", default=None, help="comma list of OUTxIN (default 4096x4096,11008x4096,4096x11008)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank and matched density (default 64, --small 4)")
    p.add_argument("--low-density", type=float, default=0.001, help="second density for the sparse providers")
    p.add_argument("--providers", default=None, help="comma list (default all): " + ",".join(ALL_PROVIDERS))
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.pick_device(args.device)
    dtype = torch.bfloat16
    tokens = args.tokens or (64 if args.small else 8192)
    rank = args.rank or (4 if args.small else 64)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = SMALL_SHAPES if args.small else SHAPES
    wanted = ALL_PROVIDERS if not args.providers else [p.strip() for p in args.providers.split(",") if p.strip()]
    wanted = sorted(dict.fromkeys(wanted), key=lambda p: p != "frozen")  # the reference first
    unknown = [p for p in wanted if p not in ALL_PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {ALL_PROVIDERS}")

    def body(runner: Runner):
        harness.print_header("bench_layer", device, runner.ceil)
        print(f"   T={tokens} tokens, bf16, LoRA rank {rank}, sparse densities r{rank}-matched and "
              f"{args.low_density:.2%}", flush=True)
        skipped_for_good = {}
        for out_f, in_f in shapes:
            case = f"{out_f}x{in_f}"
            numel = out_f * in_f
            k_lora = min(P.lora_count(in_f, out_f, rank), numel)
            k_low = max(1, round(args.low_density * numel))
            cache = {}
            facts = {k: make_factories(out_f, in_f, tokens, k, device, dtype, rank, cache)
                     for k in {k_lora, k_low}}
            ref_ms = None
            for name in wanted:
                densities = [k_lora]
                if name in LOW_DENSITY_ONLY_FOR and k_low != k_lora:
                    densities.append(k_low)
                for k in densities:
                    if name in skipped_for_good:
                        continue
                    info = {"shape": case, "k": k if name in SPARSE else "",
                            "density": (k / numel) if name in SPARSE else "",
                            "extra": {"T": tokens, "rank": rank, "dtype": "bf16", "out": out_f, "in": in_f,
                                      "matched": f"r{rank}" if k == k_lora else f"{args.low_density:g}"}}
                    row = runner.run(case, f"{name}@{k}" if name in SPARSE else name, facts[k][name], info,
                                     ref_ms=ref_ms, reference=name == "frozen")
                    note = str(row.get("note") or "")
                    if note.startswith("skipped"):  # reasons do not depend on the shape: say it once
                        skipped_for_good[name] = note
                    if name == "frozen" and row.get("ms"):
                        ref_ms = float(row["ms"])
                    ms = row.get("ms")
                    print(f"  {case:>11} {name:<14} k={k if name in SPARSE else '-':<8} "
                          f"{harness.fmt(ms):>8} ms  peak+{harness.fmt(row.get('peak_mib'))} MiB  "
                          f"{row.get('note') or ''}", flush=True)

    def summary(runner: Runner):
        rows = [r for r in runner.rows if r.get("case")]
        ref = {r["case"]: float(r["ms"]) for r in rows if r.get("provider") == "frozen" and r.get("ms")}
        for r in rows:
            if r.get("ms") and r["case"] in ref:
                r["x_ref"] = float(r["ms"]) / ref[r["case"]]
        harness.print_table(rows, [
            ("shape", "case"),
            ("provider", lambda r: str(r["provider"]).split("@")[0]),
            ("density", lambda r: f"{float(r['density']):.2%}" if r.get("density") not in ("", None) else "-"),
            ("ms", "ms"),
            ("p20-p80", lambda r: f"{harness.fmt(r.get('ms_p20'))}-{harness.fmt(r.get('ms_p80'))}"
             if r.get("ms_p20") not in ("", None) else "-"),
            ("x frozen", "x_ref"),
            ("peak+ MiB", "peak_mib"),
            ("note", lambda r: harness.clip(r.get("note") or "", 70)),
        ], title=f"bench_layer: one training step, T={tokens}, bf16 ({harness.environment(device)['gpu']})")

    return harness.guarded_main(
        lambda: Runner("layer", device, args.csv, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms), body, summary)


if __name__ == "__main__":
    sys.exit(main())
