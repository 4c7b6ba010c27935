"""compute-sanitizer driver for the CUDA radix select (select_topk_abs): small odd sizes, every kind of input
(ties, NaN/inf, excluded positions, shifted exclusion), both index dtypes. Run:
compute-sanitizer --tool memcheck|racecheck python3 <this>. With SANITIZE_TOOL=racecheck (tests/gpu/run.sh sets
it) a smaller set: racecheck only concerns the shared-memory histograms and scans, and is ~50x slower."""
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ (check_select) and the repository root (spiel)

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_select_op import check_select  # noqa: E402

if not ops.backend_info()["cuda"]["available"] or kernel_for("select_topk_abs", "cuda") is None:
    print("cuda: unavailable")
else:
    kernel = kernel_for("select_topk_abs", "cuda")
    if os.environ.get("SANITIZE_TOOL") == "racecheck":  # fp32: three 2048/1024-bin levels; bf16: one of 32768
        n = check_select(kernel, "cuda", sizes=(70_001,), kinds=("ties", "offset"),
                         dtypes=(torch.float32, torch.bfloat16), index_dtypes=(torch.int32,))
    else:
        n = check_select(kernel, "cuda", sizes=(1, 7, 1000, 70_001), dtypes=(torch.float32, torch.bfloat16))
        n += check_select(kernel, "cuda", sizes=(7, 70_001), dtypes=(torch.float16,))
    torch.cuda.synchronize()
    print(f"cuda: {n} checks")
print("sanitize_select done")
