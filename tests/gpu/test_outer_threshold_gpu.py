"""The CUDA and Triton threshold multisections (``spiel::outer_threshold``: csrc/outer.cu,
spiel/ops/backends/triton/outer.py) against the reference backend, bit for bit: ties, rows without a positive
score, a layer with hi = 0, int32/int64 keys, 1-63 sections, 7B-sized rows (4096 x 1100 and 1100 x 4096) and
70 layers; then SpIEL-MA's ``batched_topk_outer`` on CUDA against the per-layer reference op."""
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_outer_threshold_op import GPU_CASES, check_threshold  # noqa: E402


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_kernel_matches_reference(backend, case):
    kernel = kernel_for("outer_threshold", backend)
    if kernel is None or not ops.backend_info()[backend]["available"]:
        pytest.skip(f"backend {backend} has no outer_threshold kernel here")
    assert check_threshold(kernel, "cuda", [GPU_CASES[case]]) == 2


def test_batched_topk_outer_7b_shape_matches_reference():
    """Ten 4096 x 1100 layers with ~2% of their cells active: the batched regrowth (CUDA threshold, auto backend)
    returns exactly the per-layer reference op's positions, in its order."""
    from spiel.scheduler._outer import batched_topk_outer

    g = torch.Generator().manual_seed(11)
    m, n, L = 4096, 1100, 10
    rows = [torch.rand(m, generator=g).cuda() for _ in range(L)]
    cols = [torch.rand(n, generator=g).cuda() for _ in range(L)]
    excludes = [torch.randperm(m * n, generator=g)[:90_000 + 1000 * i].sort().values.to(torch.int32).cuda()
                for i in range(L)]
    counts = [18_000 + 500 * i for i in range(L)]
    got = batched_topk_outer(rows, cols, counts, excludes)
    with ops.use_backend("torch"):
        for i in range(L):
            want = ops.topk_outer(rows[i], cols[i], counts[i], exclude=excludes[i])
            assert torch.equal(got[i], want), f"layer {i}"
