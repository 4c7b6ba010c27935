"""The drop + regrow of an index update for one batch of layers (``spiel.ops.drop_regrow_indices``): the new
indices and each new slot's old slot for L rows of k, the n smallest |value| replaced by regrown positions.

    python benchmarks/bench_replace.py                 # H100: ~15 s
    python benchmarks/bench_replace.py --device cpu --small

Cases: the scheduler's batches at 7B (2**23 entries, LoRA-r64-matched k, 20% regrown): 16 attention layers
(k = 524,288) and 8 MLP layers (k = 966,656). Providers:
  op <backend>       the op (no validation) on each spiel backend that implements it
  copy 20 B/entry    a copy moving the bytes the op must move at least (values + int32 indices read, int32
                     indices + int64 order written): the floor
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Runner, common_args, fmt, guarded_main, pick_device, print_header, print_table  # noqa: E402
from bench_select import kernel_breakdown  # noqa: E402

CASES = [(16, 524_288, (4096, 4096)), (8, 966_656, (11008, 4096))]  # (rows, k, weight shape)


def main(argv=None) -> int:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--regrow", type=float, default=0.2, help="n = regrow x k")
    p.add_argument("--kernels", action="store_true", help="also print the CUDA op's time per kernel")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    from spiel import ops
    from spiel.ops._dispatch import kernel_for

    cases = [(4, 3000, (100, 300)), (2, 6000, (300, 100))] if args.small else CASES

    def body(runner: Runner) -> None:
        print_header("replace", device, runner.ceil)
        g = torch.Generator(device=device).manual_seed(0)
        for rows, k, (out_f, in_f) in cases:
            n = int(k * args.regrow)
            values, indices, regrown = [], [], []
            for _ in range(rows):
                perm = torch.randperm(out_f * in_f, device=device, generator=g)
                indices.append(perm[:k].sort().values.to(torch.int32))
                regrown.append(perm[k:k + n].sort().values)
                values.append(torch.randn(k, device=device, generator=g))
            regrown = torch.stack(regrown)
            case = f"{rows}x{k} n={n}"
            info = {"shape": f"{out_f}x{in_f}", "k": k, "rows": rows}
            floor = torch.empty(rows * k * 10, dtype=torch.uint8, device=device)
            ref = runner.run(case, "copy 20 B/entry", lambda: lambda: floor.clone(), info, reference=True)
            for backend in ("torch", "cuda"):
                if kernel_for("drop_regrow_indices", backend) is None or not ops.backend_info()[backend]["available"] \
                        or (backend == "cuda" and device.type != "cuda"):
                    runner.record({"case": case, "provider": f"op {backend}",
                                   "note": f"skipped: backend {backend} unavailable here"})
                    continue

                def run(backend=backend):
                    with ops.use_backend(backend):
                        return torch.ops.spiel.drop_regrow_indices(values, indices, regrown)
                runner.run(case, f"op {backend}", lambda: run, info, ref_ms=ref.get("ms"))
            if args.kernels and device.type == "cuda" and kernel_for("drop_regrow_indices", "cuda") is not None:
                kernel_breakdown(case, lambda: kernel_for("drop_regrow_indices", "cuda")(values, indices, regrown))
            del values, indices, regrown, floor

    def summary(runner: Runner) -> None:
        print_table(runner.rows, [("case", "case"), ("provider", "provider"), ("ms", "ms"),
                                  ("p20-p80", lambda r: f"{fmt(r.get('ms_p20'))}-{fmt(r.get('ms_p80'))}"),
                                  ("x floor", "x_ref"), ("peak MiB", "peak_mib"), ("note", "note")],
                    title="drop + regrow of one update batch: median ms (x floor = time / the 20 B/entry copy)")

    return guarded_main(lambda: Runner("replace", device, args.csv, rep_ms=50), body, summary)


if __name__ == "__main__":
    sys.exit(main())
