"""compute-sanitizer driver for the CUDA drop + regrow (drop_regrow_indices): the GPU test's cases at small sizes,
every dtype. Run: compute-sanitizer --tool memcheck|racecheck python3 <this> (racecheck: a smaller set)."""
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ (check_replace) and the repository root (spiel)

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_replace_op import GPU_CASES, check_replace  # noqa: E402

if not ops.backend_info()["cuda"]["available"] or kernel_for("drop_regrow_indices", "cuda") is None:
    print("cuda: unavailable")
else:
    kernel = kernel_for("drop_regrow_indices", "cuda")
    small = [c for c in GPU_CASES if c[0] * c[1] <= 50_000]
    if os.environ.get("SANITIZE_TOOL") == "racecheck":
        n = check_replace(kernel, "cuda", small[:8], value_dtypes=(torch.float32,), index_dtypes=(torch.int32,))
    else:
        n = check_replace(kernel, "cuda", small)
    torch.cuda.synchronize()
    print(f"cuda: {n} checks")
print("sanitize_replace done")
