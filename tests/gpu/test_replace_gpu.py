"""The CUDA drop + regrow (csrc/replace.cu, ``spiel::_cuda_drop_regrow_indices``) against the reference backend:
every value and index dtype, ties over chunk boundaries, +-0, NaN/-inf, n = 0 and n = k, more than 64 rows, regrown
positions crowded into one chunk's range (the unstaged search), 300k-entry rows; bit-equal integer outputs."""
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
from test_replace_op import GPU_CASES, check_replace, make_case  # noqa: E402

if kernel_for("drop_regrow_indices", "cuda") is None or not ops.backend_info()["cuda"]["available"]:
    pytest.skip("spiel._C with drop_regrow_indices is not built", allow_module_level=True)


@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_cuda_matches_reference(case):
    assert check_replace(kernel_for("drop_regrow_indices", "cuda"), "cuda", [GPU_CASES[case]]) == 6


def test_deterministic_and_public_op():
    g = torch.Generator().manual_seed(3)
    values, indices, regrown = make_case(5, 70_000, 9_000, 700_000, torch.float32, torch.int32, g, ties=True)
    values, indices, regrown = [v.cuda() for v in values], [i.cuda() for i in indices], regrown.cuda()
    first = ops.drop_regrow_indices(values, indices, regrown)  # auto: the CUDA kernel
    for _ in range(3):
        again = ops.drop_regrow_indices(values, indices, regrown)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    with ops.use_backend("torch"):
        want = ops.drop_regrow_indices(values, indices, regrown)
    assert torch.equal(first[0], want[0]) and torch.equal(first[1], want[1])
