"""``spiel.ops.adamw_step_`` on the GPU: the CUDA and Triton kernels against float64 truth at real sizes.

The checks are tests/test_adamw_op.py's ``check_adamw`` (guarded views at odd offsets, counts exact, errors
bounded by the fp32 reference's own), here with CUDA tensors, more tensors than one CUDA launch takes (48),
and one tensor larger than the CUDA grid's 65535 CTAs cover (its grid-stride loop).
"""
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
from test_adamw_op import HOST, HYPER, check_adamw  # noqa: E402

DEV = "cuda"


def _kernel(backend):
    if not ops.backend_info()[backend]["available"]:
        pytest.skip(f"backend {backend} unavailable: {ops.backend_info()[backend]['reason']}")
    return kernel_for("adamw_step", backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_all_dtypes(backend):
    # the empty tensor at position 2 has the host count 2**24 - 1: its count must advance in every backend
    assert check_adamw(_kernel(backend), DEV, sizes=(1, 7, 0, 1000, 2053, 1 << 16 | 3)) > 0


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_many_tensors(backend):
    sizes = tuple((37 * i) % 1500 + 1 for i in range(101))  # 101 tensors: 3 CUDA launches
    check_adamw(_kernel(backend), DEV, sizes=sizes, hypers=HYPER[:1],
                combos=[(torch.float32, torch.float32, torch.int16), (torch.bfloat16, torch.bfloat16, torch.int32),
                        (torch.float32, torch.float32, HOST)])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_huge_tensor(backend):
    # > 65535 CTAs x 1024 elements: the CUDA kernel's grid-stride loop runs twice for the tail
    check_adamw(_kernel(backend), DEV, sizes=(65535 * 1024 + 4099, 5), hypers=HYPER[:1],
                combos=[(torch.bfloat16, torch.bfloat16, torch.int16)])


@pytest.mark.parametrize("options", [{}, {"per_slot_steps": False}, {"per_slot_steps": False, "step_in_backward": True}])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sparse_adamw_fused_on_gpu(backend, options):
    """SparseAdamW: the default on CUDA is the fused op; it trains like the foreach path (per-slot or per-tensor
    host counts; stepping inside backward or in step())."""
    from torch import nn

    from spiel.nn import SparseDeltaLinear
    from spiel.optim import SparseAdamW

    _kernel(backend)
    runs = []
    for fused in (False, None):
        torch.manual_seed(0)
        layers = nn.ModuleList([SparseDeltaLinear(64, 48, num_deltas=300, generator=torch.Generator().manual_seed(i))
                                for i in range(3)]).to(DEV)
        opt = SparseAdamW(layers, lr=1e-2, weight_decay=0.05, fused=fused,
                          **(options if fused is None else {"per_slot_steps": options.get("per_slot_steps", True)}))
        assert opt._use_fused(torch.device(DEV)) == (fused is None)
        x = torch.randn(16, 64, device=DEV)
        with ops.use_backend(backend):
            for _ in range(5):
                sum(layer(x).square().sum() for layer in layers).backward()
                opt.step()
                opt.zero_grad()
        runs.append([layer.values.detach().clone() for layer in layers])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
