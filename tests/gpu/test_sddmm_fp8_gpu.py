"""The fp8 delta gradient's Hopper path (Triton quantize-transpose + cuBLASLt fp8 bands) against the exact
emulation of the reference and float64 within the e4m3 bound; odd shapes, T = 1/7/1000, several bands,
k = 0, outputs deterministic; the layer with candidates."""
import pytest
import torch

from tests.conftest import random_indices
from tests.test_sddmm_fp8 import exact_and_bound

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from spiel.ops.backends.triton import sddmm_fp8 as F8  # noqa: E402

HOPPER = torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not HOPPER, reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,out_f,in_f,k", [(1, 40, 24, 300), (7, 33, 17, 200), (1000, 250, 136, 5000),
                                            (256, 2100, 4200, 30000), (64, 48, 32, 0), (96, 20, 30, 600)])
def test_fast_path_matches_emulation_and_float64(dtype, T, out_f, in_f, k, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(T + out_f + k)
    go = (torch.randn(T, out_f, device="cuda", generator=gen) * 2).to(dtype)
    x = torch.randn(T, in_f, device="cuda", generator=gen).to(dtype)
    idx = random_indices(out_f * in_f, k, dtype=torch.int32, device="cuda")
    if out_f == 2100:
        monkeypatch.setattr(F8, "BAND_BYTES", 2 * 4208 * 512)  # several bands
    fast = kernel_for("sddmm_fp8", "triton")
    got = fast(go, x, idx, out_f, in_f)
    again = fast(go, x, idx, out_f, in_f)
    assert torch.equal(got, again)  # deterministic
    emulated = kernel_for("sddmm_fp8", "torch")(go, x, idx, out_f, in_f)
    # same e4m3 codes and scales; the GEMM's accumulation differs: Hopper's fp8 MMA keeps ~14 bits in its
    # inner accumulation (cuBLASLt promotes to fp32 every few k-steps), then the bf16 output rounding. So the
    # difference is bounded by 2**-10 of the magnitude sum_t |g| |x| plus one bf16 rounding.
    r, c = idx.long() // in_f, idx.long() % in_f
    magnitude = (go.float().abs()[:, r] * x.float().abs()[:, c]).sum(0)
    assert bool(((got - emulated).abs() <= 2 ** -7 * emulated.abs() + 2 ** -10 * magnitude + 1e-30).all())
    exact, bound = exact_and_bound(go.cpu(), x.cpu(), idx.cpu(), in_f)
    err = (got.cpu().double() - exact).abs()
    assert bool((err <= bound * 1.01 + 1e-6).all())


@pytest.mark.skipif(not HOPPER, reason="fp8 tensor cores need sm_89+")
def test_layer_with_candidates_fp8():
    from spiel.nn import SparseDeltaLinear

    torch.manual_seed(0)
    layer = SparseDeltaLinear(256, 384, num_deltas=2000, device="cuda", dtype=torch.bfloat16)
    layer.fp8_weight_grad = True
    free = torch.ones(384 * 256, dtype=torch.bool)
    free[layer.indices.long().cpu()] = False
    cand = free.nonzero().view(-1)[::97][:500].cuda()
    layer.set_candidates(cand)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    both = torch.cat([layer.indices, layer.candidates])
    want = ops.sddmm_fp8(g.reshape(-1, 384), x.reshape(-1, 256), both, 384, 256)
    torch.testing.assert_close(layer.values.grad, want[:2000])
    torch.testing.assert_close(layer.candidate_values.grad, want[2000:])
