"""The threshold search of SpIEL-MA's regrowth for one update batch (``spiel.ops.outer_threshold``): 60 bits of
multisection over the outer product of the SM3 row/column accumulators, the active cells excluded.

    python benchmarks/bench_outer.py                 # H100: ~20 s
    python benchmarks/bench_outer.py --device cpu --small

Cases: the scheduler's MA batches at 7B (at most 2**23 active entries, LoRA-r64-matched k, 20% regrown): 16
attention layers (4096 x 4096, k = 524,288) and 8 MLP layers (11008 x 4096, k = 966,656). Providers:
  op torch S=63     the reference as the scheduler runs it: 63 thresholds per round, 10 rounds, ~15 launches each
  op <backend> S=15 the Triton / CUDA kernels as the scheduler runs them: 15 thresholds per round, 16 rounds,
                    one launch each (and S=63 on CUDA for comparison)
x ref = time / the reference's.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Runner, common_args, fmt, guarded_main, pick_device, print_header, print_table  # noqa: E402

CASES = [(16, 524_288, (4096, 4096)), (8, 966_656, (11008, 4096))]  # (layers, k, weight shape)


def rounds_for(sections: int) -> int:
    return math.ceil(60 / math.log2(sections + 1))


def main(argv=None) -> int:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--regrow", type=float, default=0.2, help="need = regrow x k")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    from spiel import ops
    from spiel.ops._dispatch import kernel_for

    cases = [(3, 3000, (100, 300)), (2, 6000, (300, 100))] if args.small else CASES

    def body(runner: Runner) -> None:
        print_header("outer", device, runner.ceil)
        g = torch.Generator(device=device).manual_seed(0)
        for layers, k, (m, n) in cases:
            rows = torch.rand(layers, m, device=device, generator=g, dtype=torch.float64)
            cols = torch.rand(layers, n, device=device, generator=g, dtype=torch.float64).sort(1, descending=True).values
            keys = torch.stack([torch.randperm(m * n, device=device, generator=g)[:k].sort().values
                                for _ in range(layers)]).to(torch.int32)
            row_start = torch.searchsorted(keys, (torch.arange(m + 1, device=device) * n).to(torch.int32)
                                           .expand(layers, m + 1).contiguous())
            need = torch.full((layers,), int(k * args.regrow), dtype=torch.int64, device=device)
            hi = rows.amax(1) * cols.amax(1)
            case = f"{layers}x{m}x{n} k={k}"
            info = {"shape": f"{m}x{n}", "k": k, "rows": layers}
            ref = {}
            for backend, sections in (("torch", 63), ("triton", 15), ("cuda", 15), ("cuda", 63)):
                provider = f"op {backend} S={sections}"
                if kernel_for("outer_threshold", backend) is None or not ops.backend_info()[backend]["available"] \
                        or (backend != "torch" and device.type != "cuda"):
                    runner.record({"case": case, "provider": provider,
                                   "note": f"skipped: backend {backend} unavailable here"})
                    continue

                def run(backend=backend, sections=sections):
                    with ops.use_backend(backend):
                        return torch.ops.spiel.outer_threshold(rows, cols, keys, row_start, need, hi, sections,
                                                               rounds_for(sections))
                row = runner.run(case, provider, lambda: run, info, ref_ms=ref.get("ms"), reference=not ref)
                ref = ref or row
            del rows, cols, keys, row_start

    def summary(runner: Runner) -> None:
        print_table(runner.rows, [("case", "case"), ("provider", "provider"), ("ms", "ms"),
                                  ("p20-p80", lambda r: f"{fmt(r.get('ms_p20'))}-{fmt(r.get('ms_p80'))}"),
                                  ("x ref", "x_ref"), ("peak MiB", "peak_mib"), ("note", "note")],
                    title="threshold multisection of one MA update batch: median ms (x ref = time / op torch S=63)")

    return guarded_main(lambda: Runner("outer", device, args.csv, rep_ms=50), body, summary)


if __name__ == "__main__":
    sys.exit(main())
