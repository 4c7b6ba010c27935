"""The SpIEL-AG candidate probe on one layer: where its time goes (in the 7B profiles the probe step costs
0.4-0.6 s over a plain step, ~2 ms per layer; benchmarks/NOTES.md).

    python benchmarks/bench_select.py                 # H100: ~20 s
    python benchmarks/bench_select.py --device cpu --small

Case: one layer's probe at T = 2048 tokens (the 7B e2e batch) with LoRA-r64-matched active deltas (2.14%) and
k = 0.2 x active candidates (the first reselection's regrow count). Providers:
  gemm fp32 out          the dense gradient as fp32, all at once: the floor the probe cannot beat
  probe <backend>        ``top_gradient_entries`` at the scheduler's default 2^26 gradient elements per block,
                         with ``spiel.ops.select_topk_abs`` on each spiel backend that implements it
  probe 2^24 <backend>   the same with 16 M elements per block (the multi-block path)
  select <backend>       ``select_topk_abs`` alone on the layer's whole gradient (the real |grad| distribution),
                         the active indices excluded; ``bf16``: on the gradient rounded to bf16 (what the probe
                         selects from when the activations are bf16)
  one pass (amax)        one streaming read of that gradient (fp32 / bf16): the floor of one select pass
  torch.topk             ``torch.topk`` on the same gradient (unsorted, no exclusion), for scale
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Runner, common_args, fmt, guarded_main, pick_device, print_header, print_table  # noqa: E402

SHAPES = [(11008, 4096), (4096, 4096)]


def kernel_breakdown(case: str, fn, calls: int = 20) -> None:
    """Mean GPU time per call of each kernel ``fn`` launches (torch.profiler), printed as a small table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls / 1000.0, e.count // calls) for e in prof.key_averages()
            if e.device_time_total > 0]
    print(f"\n{case}: kernels per call (ms)")
    for name, ms, count in sorted(rows, key=lambda r: -r[1]):
        print(f"  {ms:8.4f}  x{count}  {name[:110]}")


def main(argv=None) -> int:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--tokens", type=int, default=None, help="T (default 2048, --small 64)")
    p.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--density", type=float, default=0.0214, help="active density (LoRA r64-matched on 7B)")
    p.add_argument("--regrow", type=float, default=0.2, help="candidates = regrow x active")
    p.add_argument("--kernels", action="store_true",
                   help="also print the CUDA select's time per kernel (torch.profiler, 20 calls per shape)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    from spiel import ops
    from spiel.ops._dispatch import kernel_for
    from spiel.scheduler._select import top_gradient_entries

    T = args.tokens or (64 if args.small else 2048)
    shapes = [(300, 256), (128, 128)] if args.small else SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def body(runner: Runner) -> None:
        print_header("select", device, runner.ceil)
        g = torch.Generator(device=device).manual_seed(0)
        for out_f, in_f in shapes:
            n = out_f * in_f
            active = torch.randperm(n, device=device, generator=g)[: int(n * args.density)].sort().values
            active = active.to(torch.int32)
            k = max(1, int(active.numel() * args.regrow))
            G = torch.randn(T, out_f, device=device, dtype=dtype, generator=g)
            X = torch.randn(T, in_f, device=device, dtype=dtype, generator=g)
            case = f"{out_f}x{in_f} T={T} k={k}"
            info = {"shape": f"{out_f}x{in_f}", "k": k, "density": args.density}
            if device.type == "cuda":
                gemm = lambda: torch.mm(G.t(), X, out_dtype=torch.float32)  # noqa: E731
            else:
                gemm = lambda: torch.mm(G.t().float(), X.float())  # noqa: E731
            ref = runner.run(case, "gemm fp32 out", lambda: gemm, info, reference=True)
            ref_ms = ref.get("ms")
            grad = gemm().view(-1)
            grad16 = grad.bfloat16()
            kb = min(k, grad.numel())
            for backend in ("torch", "cuda"):
                if kernel_for("select_topk_abs", backend) is None or not ops.backend_info()[backend]["available"] \
                        or (backend == "cuda" and device.type != "cuda"):
                    runner.record({"case": case, "provider": f"select {backend}",
                                   "note": f"skipped: backend {backend} unavailable here"})
                    continue

                def with_backend(fn, backend=backend):
                    def run():
                        with ops.use_backend(backend):
                            return fn()
                    return run
                runner.run(case, f"probe {backend}",
                           lambda: with_backend(lambda: top_gradient_entries(G, X, active, k, 1 << 26)), info,
                           ref_ms=ref_ms)
                runner.run(case, f"probe 2^24 {backend}",
                           lambda: with_backend(lambda: top_gradient_entries(G, X, active, k, 1 << 24)), info,
                           ref_ms=ref_ms)
                for values, label in ((grad, ""), (grad16, " bf16")):
                    runner.run(case, f"select {backend}{label}",
                               lambda: with_backend(lambda: torch.ops.spiel.select_topk_abs(values, kb, active, 0)),
                               info, ref_ms=ref_ms)  # the op itself, as the probe calls it: no validation syncs
            if args.kernels and device.type == "cuda" and kernel_for("select_topk_abs", "cuda") is not None:
                for values, label in ((grad, "fp32"), (grad16, "bf16")):
                    kernel_breakdown(f"{case} {label}", lambda: kernel_for("select_topk_abs", "cuda")(values, kb, active, 0))
            runner.run(case, "one pass (amax)", lambda: lambda: grad.amax(), info, ref_ms=ref_ms)
            runner.run(case, "one pass (amax) bf16", lambda: lambda: grad16.amax(), info, ref_ms=ref_ms)
            runner.run(case, "torch.topk", lambda: lambda: torch.topk(grad, kb, sorted=False), info, ref_ms=ref_ms)
            del grad, grad16

    def summary(runner: Runner) -> None:
        print_table(runner.rows, [("case", "case"), ("provider", "provider"), ("ms", "ms"),
                                  ("p20-p80", lambda r: f"{fmt(r.get('ms_p20'))}-{fmt(r.get('ms_p80'))}"),
                                  ("x gemm", "x_ref"), ("peak MiB", "peak_mib"), ("note", "note")],
                    title="AG probe on one layer: median ms (x gemm = time / the dense fp32-out GEMM)")

    return guarded_main(lambda: Runner("select", device, args.csv, rep_ms=50), body, summary)


if __name__ == "__main__":
    sys.exit(main())
