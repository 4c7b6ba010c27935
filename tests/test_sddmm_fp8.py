"""The opt-in fp8 delta gradient (``spiel.ops.sddmm_fp8``): the reference emulation against float64 within
the e4m3 error bound, opcheck, the layer's ``fp8_weight_grad`` switch, bad input. The Hopper fast path is
compared with the emulation in tests/gpu/test_sddmm_fp8_gpu.py."""
import pytest
import torch

import spiel.ops as ops
from spiel.ops.backends.reference.sddmm_fp8 import quantize_columns
from spiel.ops.sddmm_fp8 import column_scales
from tests.conftest import random_indices

# per-element e4m3 error: relative 2**-4 (3 mantissa bits, round to nearest) in the normal range, absolute
# scale * 2**-10 (half the smallest subnormal) below it; the product of two such errors, plus bf16 output
REL = 2.0 ** -4
BF16 = 2.0 ** -8


def exact_and_bound(go, x, idx, in_f):
    g64, x64 = go.double(), x.double()
    r, c = idx.long() // in_f, idx.long() % in_f
    exact = (g64[:, r] * x64[:, c]).sum(0)
    s_g, s_x = column_scales(go).double(), column_scales(x).double()
    err_g = torch.maximum(REL * g64.abs(), s_g * 2.0 ** -10)[:, r]
    err_x = torch.maximum(REL * x64.abs(), s_x * 2.0 ** -10)[:, c]
    ga, xa = g64.abs()[:, r], x64.abs()[:, c]
    bound = (ga * err_x + xa * err_g + err_g * err_x).sum(0)
    return exact, bound * 1.001 + BF16 * (exact.abs() + bound) + 1e-30


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,out_f,in_f,k", [(1, 7, 9, 20), (7, 33, 17, 100), (300, 40, 70, 700), (64, 16, 32, 0)])
def test_reference_within_e4m3_bound(dtype, index_dtype, T, out_f, in_f, k):
    gen = torch.Generator().manual_seed(T * 1000 + out_f + k)
    go = (torch.randn(T, out_f, generator=gen) * torch.rand(out_f, generator=gen) * 3).to(dtype)
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    go[:, 0] = 0  # an all-zero column (scale 1)
    idx = random_indices(out_f * in_f, k, dtype=index_dtype, generator=gen)
    got = ops.sddmm_fp8(go, x, idx, out_f, in_f)
    assert got.dtype == torch.float32 and got.shape == (k,)
    exact, bound = exact_and_bound(go, x, idx, in_f)
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


def test_reference_relative_error_is_small_on_random_data():
    gen = torch.Generator().manual_seed(0)
    go, x = torch.randn(512, 64, generator=gen).bfloat16(), torch.randn(512, 48, generator=gen).bfloat16()
    idx = random_indices(64 * 48, 900, generator=gen)
    got = ops.sddmm_fp8(go, x, idx, 64, 48).double()
    exact, _ = exact_and_bound(go, x, idx, 48)
    rel = float((got - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.08, rel  # quantization is really applied, and the error stays at e4m3's level


def test_quantization_codes_are_e4m3():
    x = torch.tensor([[1.0, -3.0, 0.0], [448.0, 2.5, 0.0], [-0.001, 1e-9, 0.0]])
    s = column_scales(x)
    assert torch.equal(s, torch.tensor([448.0 / 448.0, 3.0 / 448.0, 1.0]))
    q = quantize_columns(x, s)
    assert torch.equal(q, q.to(torch.float8_e4m3fn).float())
    assert float(q.abs().max()) <= 448.0


def test_opcheck():
    gen = torch.Generator().manual_seed(1)
    go, x = torch.randn(9, 12, generator=gen), torch.randn(9, 10, generator=gen)
    idx = random_indices(120, 30, generator=gen)
    torch.library.opcheck(torch.ops.spiel.sddmm_fp8.default, (go, x, idx, 12, 10))


def test_layer_fp8_weight_grad_switch():
    from spiel.nn import SparseDeltaLinear

    gen = torch.Generator().manual_seed(2)
    layer = SparseDeltaLinear(24, 40, num_deltas=150, generator=gen)
    with torch.no_grad():
        layer.values.normal_(generator=gen)
    x = torch.randn(5, 7, 24, generator=gen, requires_grad=True)
    grads = {}
    for fp8 in (False, True):
        layer.fp8_weight_grad = fp8
        layer.values.grad = None
        x.grad = None
        y = layer(x)
        y.backward(torch.ones_like(y))
        grads[fp8] = (layer.values.grad.clone(), x.grad.clone())
    go = torch.ones(35, 40)
    want = ops.sddmm_fp8(go, x.detach().reshape(-1, 24), layer.indices, 40, 24)
    torch.testing.assert_close(grads[True][0], want, rtol=0, atol=0)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=0, atol=0)  # dX stays exact
    assert not torch.equal(grads[True][0], grads[False][0])


def test_bad_input():
    go, x = torch.randn(4, 6), torch.randn(4, 5)
    idx = torch.tensor([0, 3, 7])
    with pytest.raises(TypeError, match="input"):
        ops.sddmm_fp8(go, x.double(), idx, 6, 5)
    with pytest.raises(ValueError, match="out_features"):
        ops.sddmm_fp8(go, x, idx, 7, 5)
    with pytest.raises(ValueError, match="same number of tokens"):
        ops.sddmm_fp8(go, torch.randn(3, 5), idx, 6, 5)
    with pytest.raises(TypeError, match="indices"):
        ops.sddmm_fp8(go, x, idx.float(), 6, 5)
