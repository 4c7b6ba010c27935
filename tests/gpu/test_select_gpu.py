"""The Triton radix-select block_top on the GPU at the probe's real block sizes, against the reference
(identical positions), and the probe on both backends (tests/test_select_triton.py has the checks)."""
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spiel.ops as ops  # noqa: E402
import spiel.scheduler  # noqa: E402,F401
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_select_triton import check_block_top, check_probe_backends  # noqa: E402

DEV = "cuda"


def _triton():
    if not ops.backend_info()["triton"]["available"]:
        pytest.skip("triton unavailable")
    return kernel_for("block_top", "triton")


def test_block_top_small_and_odd():
    assert check_block_top(_triton(), DEV, sizes=(1, 5, 300, 4099, 1 << 16 | 7)) > 0


@pytest.mark.parametrize("n", [4096 * 4096, 11008 * 4096])
def test_block_top_probe_sizes(n):
    # the 7B probe's blocks: LoRA-r64 active density 2.14%, regrow 20% of it; reference chunked above 2**25
    check_block_top(_triton(), DEV, sizes=(n,), kinds=("rand", "ties", "excluded"))


def test_probe_backends_agree():
    _triton()
    assert check_probe_backends(DEV) > 0
    from spiel.scheduler._select import top_gradient_entries

    g = torch.Generator(device=DEV).manual_seed(0)
    go = torch.randn(512, 11008, device=DEV, dtype=torch.bfloat16, generator=g)
    x = torch.randn(512, 4096, device=DEV, dtype=torch.bfloat16, generator=g)
    exclude = torch.randperm(11008 * 4096, device=DEV, generator=g)[:964_000].sort().values.int()
    with ops.use_backend("torch"):
        want = top_gradient_entries(go, x, exclude, 192_979)
    with ops.use_backend("triton"):
        got = top_gradient_entries(go, x, exclude, 192_979)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
