"""Drive the CUDA sddmm kernels (every strategy, bf16/fp16/fp32, int32/int64) at small shapes, for
compute-sanitizer memcheck and racecheck (tests/gpu/run.sh sanitize). Each result is compared with a float64
gather-dot; exits 1 on a mismatch, so a clean sanitizer run also proves the kernels computed the right thing.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from spiel.ops.backends import sddmm_plan as P  # noqa: E402

import spiel._C  # noqa: E402,F401  (registers torch.ops.spiel._cuda_sddmm)

DEV = "cuda"
CASES = [  # T, out, in, k, concentrated
    (70, 300, 200, 2000, False),
    (33, 260, 136, 600, True),
    (9, 17, 40, 17 * 40, False),
    # feature counts divisible by 8: the sm90a wgmma dense_tile kernel on an H100 (T splits; a tail of T halves)
    (70, 304, 200, 2000, False),
    (130, 1152, 4096, 40000, False),
    (96, 1024, 1024, 104858, False),  # 10%: > 768 entries per half tile (the overflow loop)
]


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    # SANITIZE_SDDMM_CASES="3" runs only those cases (racecheck is slow on the large ones)
    pick = os.environ.get("SANITIZE_SDDMM_CASES", "")
    cases = [CASES[int(i)] for i in pick.split(",")] if pick else CASES
    for T, out_f, in_f, k, concentrated in cases:
        if concentrated:
            rows = torch.randperm(out_f)[: out_f // 10]
            cols = torch.randperm(in_f)[: in_f // 10]
            pool = (rows[:, None] * in_f + cols[None, :]).reshape(-1)
            flat = pool[torch.randperm(pool.numel())[:k]].sort().values
        else:
            flat = torch.randperm(out_f * in_f)[:k].sort().values
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            go = torch.randn(T, out_f, device=DEV).to(dtype)
            x = torch.randn(T, in_f, device=DEV).to(dtype)
            r, c = flat // in_f, flat % in_f
            want = (go.double().cpu()[:, r] * x.double().cpu()[:, c]).sum(0)
            for index_dtype in (torch.int32, torch.int64):
                idx = flat.to(device=DEV, dtype=index_dtype)
                plan = P.build_plan(idx, out_f, in_f)
                runs = [(s, lambda s=s: P.cuda_sddmm(go, x, idx, out_f, in_f, plan, strategy=s))
                        for s in P.STRATEGIES]
                # a row plan: the wgmma kernel without a full plan where it applies (cuBLAS bands elsewhere)
                row_plan = P.build_row_plan(idx, out_f, in_f)
                runs.append(("row_plan", lambda: torch.ops.spiel._cuda_sddmm(go, x, idx, out_f, in_f, row_plan)))
                for name, run in runs:
                    got = run().double().cpu()
                    tol = 1e-2 * want.abs().max().item() + 1e-3
                    if not torch.allclose(got, want, rtol=1e-2, atol=tol):
                        failures += 1
                        print(f"MISMATCH T={T} {out_f}x{in_f} k={k} {dtype} {index_dtype} {name}", flush=True)
    torch.cuda.synchronize()
    print(f"sanitize_sddmm: {failures} mismatches", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
