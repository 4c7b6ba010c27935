"""compute-sanitizer driver for the CUDA threshold multisection (outer_threshold): the CPU test's cases and one
larger one, both key dtypes. Run: compute-sanitizer --tool memcheck|racecheck python3 <this>."""
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ (check_threshold) and the repository root (spiel)

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_outer_threshold_op import CASES, check_threshold  # noqa: E402

if not ops.backend_info()["cuda"]["available"] or kernel_for("outer_threshold", "cuda") is None:
    print("cuda: unavailable")
else:
    n = check_threshold(kernel_for("outer_threshold", "cuda"), "cuda", CASES + [(3, 300, 257, 31, 3, None)])
    torch.cuda.synchronize()
    print(f"cuda: {n} checks")
print("sanitize_outer done")
