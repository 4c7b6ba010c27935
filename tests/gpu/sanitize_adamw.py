"""compute-sanitizer driver for the fused AdamW kernels (CUDA and Triton): small odd sizes, every dtype
combination, more tensors than one CUDA launch takes. Run: compute-sanitizer --tool memcheck python3 <this>."""
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ (check_adamw) and the repository root (spiel)

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_adamw_op import HYPER, check_adamw  # noqa: E402

for backend in ("cuda", "triton"):
    if not ops.backend_info()[backend]["available"]:
        print(f"{backend}: unavailable")
        continue
    kernel = kernel_for("adamw_step", backend)
    n = check_adamw(kernel, "cuda", sizes=(1, 7, 0, 1029), hypers=HYPER[:2])
    n += check_adamw(kernel, "cuda", sizes=tuple(range(1, 52)), hypers=HYPER[:1],
                     combos=[(torch.float16, torch.float32, torch.float32)])
    torch.cuda.synchronize()
    print(f"{backend}: {n} checks")
print("sanitize_adamw done")
