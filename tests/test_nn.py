"""SparseDeltaLinear against a dense nn.Linear whose weight is W + scatter(indices, values)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spiel.ops as ops
from spiel.nn import SparseDeltaLinear, random_indices
from spiel.nn.linear import index_dtype_for, resolve_num_deltas
from spiel.quant import NF4Weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (7, 13), (33, 5), (64, 48)]  # (in, out)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _layer(in_f, out_f, bias, dtype, k=None, values_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    k = k if k is not None else max(1, (in_f * out_f) // 3)
    layer = SparseDeltaLinear(in_f, out_f, bias=bias, num_deltas=k, dtype=dtype, values_dtype=values_dtype,
                              generator=_gen(seed))
    with torch.no_grad():
        layer.values.normal_(generator=_gen(seed + 1))
    return layer


def _dense_reference(layer):
    """nn.Linear with weight = round(fp32(W) + fp32(delta)) (the contract's merge), requiring grad."""
    w = layer.weight.detach().float().clone().view(-1)
    w[layer.indices.long()] += layer.values.detach().float()
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      dtype=layer.weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(w.view(layer.out_features, layer.in_features).to(layer.weight.dtype))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_matches_dense_linear(dtype, bias, shape, lead):
    in_f, out_f = shape
    layer = _layer(in_f, out_f, bias, dtype)
    dense = _dense_reference(layer)
    x = torch.randn(*lead, in_f, generator=_gen(3)).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = dense(x_ref)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn(y.shape, generator=_gen(4)).to(dtype)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    # values' gradient = the dense weight gradient gathered at the indices; compare with an fp32 dense gradient
    g32, x32 = g.float().reshape(-1, out_f), x.detach().float().reshape(-1, in_f)
    dw = (g32.t() @ x32).view(-1)[layer.indices.long()]
    assert layer.values.grad.dtype == layer.values.dtype
    torch.testing.assert_close(layer.values.grad, dw, atol=1e-4 * math.sqrt(max(1, x32.shape[0])), rtol=1e-4)
    torch.testing.assert_close(layer.values.grad.to(dtype), dense.weight.grad.view(-1)[layer.indices.long()],
                               **TOL[dtype])
    if bias:
        assert layer.bias.grad.dtype == dtype
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **TOL[dtype])
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_values(values_dtype):
    layer = _layer(9, 6, True, torch.float32, values_dtype=values_dtype)
    dense = _dense_reference(layer)
    x = torch.randn(4, 9, generator=_gen(5))
    torch.testing.assert_close(layer(x), dense(x))
    layer(x).sum().backward()
    assert layer.values.grad.dtype == values_dtype


def test_fp32_exact_against_float64():
    layer = _layer(13, 7, True, torch.float32)
    x = torch.randn(6, 13, generator=_gen(6), requires_grad=True)
    y = layer(x)
    w64 = layer.weight.detach().double().clone().view(-1)
    w64[layer.indices.long()] += layer.values.detach().double()
    y64 = x.detach().double() @ w64.view(7, 13).t() + layer.bias.detach().double()
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)


def test_attributes_and_helpers():
    layer = _layer(10, 4, True, torch.bfloat16, k=7)
    assert isinstance(layer, nn.Linear)
    assert layer.in_features == 10 and layer.out_features == 4
    assert layer.num_deltas == 7 and layer.indices.dtype == torch.int32
    assert torch.all(layer.indices[1:] > layer.indices[:-1])
    assert isinstance(layer.values, nn.Parameter) and layer.values.dtype == torch.float32
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.bfloat16
    assert layer.candidates is None and layer.candidate_values is None and layer.gradient_probe is None
    assert set(layer.state_dict()) == {"weight", "bias", "indices", "values"}
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "values"]
    r = repr(layer)
    assert "num_deltas=7" in r and "in_features=10" in r and "bfloat16" in r
    d = layer.delta_weight()
    assert d.shape == (4, 10) and torch.count_nonzero(d) <= 7
    assert torch.equal(d.view(-1)[layer.indices.long()], layer.values.detach())
    expected = (layer.weight.float() + d).to(torch.bfloat16)
    assert torch.equal(layer.merged_weight(), expected)
    assert torch.equal(layer.sddmm_plan, ops.sddmm_plan(layer.indices, 4, 10))
    assert "sddmm_plan" not in layer.state_dict()


def test_fresh_layer_is_identity_delta():
    torch.manual_seed(0)
    layer = SparseDeltaLinear(12, 5, num_deltas=10)
    assert torch.count_nonzero(layer.values) == 0
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_density_and_count_errors():
    with pytest.raises(ValueError, match="density"):
        SparseDeltaLinear(4, 4, density=0.0)
    with pytest.raises(ValueError, match="density"):
        SparseDeltaLinear(4, 4, density=1.5)
    with pytest.raises(ValueError, match="more than"):
        SparseDeltaLinear(4, 4, num_deltas=17)
    with pytest.raises(ValueError, match="exactly one"):
        SparseDeltaLinear(4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        SparseDeltaLinear(4, 4, num_deltas=3, density=0.5)
    with pytest.raises(TypeError, match="values_dtype"):
        SparseDeltaLinear(4, 4, num_deltas=3, values_dtype=torch.int32)
    with pytest.raises(TypeError, match="integer"):
        SparseDeltaLinear(4, 4, num_deltas=2.5)
    assert SparseDeltaLinear(4, 4, density=1.0).num_deltas == 16
    assert resolve_num_deltas(1000, density=0.01) == 10
    assert resolve_num_deltas(10, density=1e-6) == 1


def test_random_indices_paths():
    cases = [(10, 0), (10, 10), (1000, 37), ((1 << 22) + 8, 1000), ((1 << 23), 3), ((1 << 22) + 10, (1 << 22) - 5)]
    for numel, k in cases:
        idx = random_indices(numel, k, generator=_gen(1))
        assert idx.numel() == k and idx.dtype == torch.int32
        if k:
            assert int(idx.min()) >= 0 and int(idx.max()) < numel
            assert torch.all(idx[1:] > idx[:-1])
    assert torch.equal(random_indices(10**8, 500, generator=_gen(3)), random_indices(10**8, 500, generator=_gen(3)))
    assert index_dtype_for(2**31 - 1) == torch.int32 and index_dtype_for(2**31) == torch.int64
    assert random_indices(2**31 + 4, 5, generator=_gen(0)).dtype == torch.int64


def test_random_indices_uniform():
    # every position is equally likely, on both sampling paths
    counts = torch.zeros(8)
    for s in range(400):
        counts[random_indices(8, 3, generator=_gen(s)).long()] += 1
    assert torch.allclose(counts / 400, torch.full((8,), 3 / 8), atol=0.08)
    numel = (1 << 22) + 16
    idx = torch.cat([random_indices(numel, 2000, generator=_gen(s)).long() for s in range(5)])
    hist = torch.bincount(idx * 8 // numel, minlength=8).float() / idx.numel()
    assert torch.allclose(hist, torch.full((8,), 1 / 8), atol=0.02)


def test_from_linear_shares_storage():
    lin = nn.Linear(20, 6).to(torch.bfloat16)
    ptr = lin.weight.data_ptr()
    layer = SparseDeltaLinear.from_linear(lin, density=0.1, generator=_gen(0))
    assert layer.weight is lin.weight and layer.bias is lin.bias and layer.weight.data_ptr() == ptr
    assert not lin.weight.requires_grad
    assert layer.num_deltas == 12
    x = torch.randn(2, 20, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), lin(x))  # zero deltas
    with pytest.raises(TypeError, match="already has deltas"):
        SparseDeltaLinear.from_linear(layer, num_deltas=1)
    with pytest.raises(TypeError):
        SparseDeltaLinear.from_linear(nn.Conv1d(2, 2, 1), num_deltas=1)
    with pytest.raises(TypeError):
        SparseDeltaLinear.from_linear(nn.Linear(4, 4).double(), num_deltas=1)


def test_from_nf4weight():
    w = torch.randn(12, 32, generator=_gen(0))
    nf4 = NF4Weight.quantize(w, blocksize=64, dtype=torch.float32)
    layer = SparseDeltaLinear.from_linear(nf4, num_deltas=40, bias=torch.randn(12), generator=_gen(1))
    assert layer.weight is nf4 and layer.is_quantized
    with torch.no_grad():
        layer.values.normal_(generator=_gen(2))
    ref = nf4.dequantize(torch.float32).view(-1).clone()
    ref[layer.indices.long()] += layer.values.detach()
    ref = ref.view(12, 32).requires_grad_(True)
    x = torch.randn(3, 32, generator=_gen(3), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, ref, layer.bias.detach())
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.values.grad, ref.grad.view(-1)[layer.indices.long()])
    torch.testing.assert_close(layer.merged_weight(), ref.detach())
    sd = layer.state_dict()
    assert {"weight_packed", "weight_absmax", "indices", "values", "bias"} <= set(sd)
    with pytest.raises(TypeError, match="dense"):
        layer.merge_()


def test_set_indices_contract():
    layer = _layer(10, 8, True, torch.float32, k=6)
    values = layer.values
    old_idx = layer.indices.clone()
    old_vals = layer.values.detach().clone()
    layer(torch.randn(2, 10)).sum().backward()
    assert layer.values.grad is not None
    # keep two old positions, add three new ones; values default: carried over / zero
    new_pos = sorted(set(range(80)) - set(old_idx.tolist()))[:3]
    new = torch.tensor(sorted(old_idx[:2].tolist() + new_pos), dtype=torch.int64)
    layer.set_indices(new)
    assert layer.values is values and layer.values.grad is None
    assert layer.indices.dtype == torch.int32 and torch.equal(layer.indices, new.int())
    for i, pos in enumerate(new.tolist()):
        expect = old_vals[old_idx.tolist().index(pos)] if pos in old_idx.tolist() else 0.0
        assert float(layer.values.detach()[i]) == float(expect)
    assert torch.equal(layer.sddmm_plan, ops.sddmm_plan(layer.indices, 8, 10))
    # explicit values, same k (in place)
    idx_tensor = layer.indices
    layer.set_indices(torch.tensor([0, 5, 9, 40, 79]), torch.arange(5.0))
    assert layer.indices is idx_tensor and torch.equal(layer.values.detach(), torch.arange(5.0))
    dense = _dense_reference(layer)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), dense(x))
    for bad, match in [(torch.tensor([3, 1]), "sorted"), (torch.tensor([1, 1]), "unique"),
                       (torch.tensor([0, 80]), r"\[0, 80\)"), (torch.tensor([-1, 2]), r"\[0, 80\)"),
                       (torch.tensor([[1, 2]]), "1-D"), (torch.tensor([1.0, 2.0]), "integer")]:
        with pytest.raises((ValueError, TypeError), match=match):
            layer.set_indices(bad)
    with pytest.raises(ValueError, match="one per index"):
        layer.set_indices(torch.tensor([1, 2]), torch.zeros(3))
    assert torch.equal(layer.indices, torch.tensor([0, 5, 9, 40, 79], dtype=torch.int32))  # unchanged


def test_candidates_accumulate_gradient():
    layer = _layer(16, 12, True, torch.float32, k=20)
    free = sorted(set(range(192)) - set(layer.indices.tolist()))
    cand = torch.tensor(free[::7][:15])
    layer.set_candidates(cand)
    assert layer.candidate_values.requires_grad and layer.candidate_values.is_leaf
    assert not isinstance(layer.candidate_values, nn.Parameter)
    assert torch.equal(layer.sddmm_plan, ops.sddmm_plan(torch.cat([layer.indices, layer.candidates]), 12, 16))
    total = torch.zeros(192)
    for step in range(3):  # gradient accumulates over steps (AG accumulation)
        x = torch.randn(5, 16, generator=_gen(10 + step))
        g = torch.randn(5, 12, generator=_gen(20 + step))
        layer(x).backward(g)
        total += (g.t() @ x).view(-1)
    torch.testing.assert_close(layer.candidate_values.grad, total[cand], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.values.grad, total[layer.indices.long()], atol=1e-4, rtol=1e-4)
    assert "candidates" not in layer.state_dict()
    with pytest.raises(ValueError, match="overlap"):
        layer.set_indices(torch.cat([layer.indices.long(), cand[:1]]).sort().values)
    with pytest.raises(ValueError, match="disjoint"):
        layer.set_candidates(layer.indices[:2])
    layer.clear_candidates()
    assert layer.candidates is None and layer.candidate_values is None
    assert torch.equal(layer.sddmm_plan, ops.sddmm_plan(layer.indices, 12, 16))


def test_gradient_probe():
    layer = _layer(6, 4, False, torch.float32, k=3)
    seen = []
    layer.gradient_probe = lambda lyr, go, x: seen.append((lyr, go.shape, x.shape))
    x = torch.randn(2, 3, 6, requires_grad=True)
    layer(x).sum().backward()
    assert seen == [(layer, (6, 4), (6, 6))]
    layer.gradient_probe = None
    layer(x).sum().backward()
    assert len(seen) == 1


def test_merge_unmerge_exact_bf16():
    layer = _layer(40, 24, True, torch.bfloat16, k=100)
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    y0 = layer(x)
    layer.merge_()
    assert layer.merged and layer.merge_saved.numel() == 100 and "merged=True" in repr(layer)
    assert torch.equal(layer.weight, layer.merged_weight())
    torch.testing.assert_close(layer(x), y0)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_indices(layer.indices)
    layer.merge_()  # idempotent
    layer.unmerge_()
    assert not layer.merged and torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y0)


def test_state_dict_roundtrip_and_resize():
    src = _layer(10, 8, True, torch.float32, k=9, seed=1)
    dst = _layer(10, 8, True, torch.float32, k=4, seed=2)
    values = dst.values
    res = dst.load_state_dict(src.state_dict())  # different k: resized consistently
    assert not res.missing_keys and not res.unexpected_keys
    assert dst.values is values and dst.num_deltas == 9
    assert torch.equal(dst.indices, src.indices) and torch.equal(dst.values, src.values)
    assert torch.equal(dst.sddmm_plan, src.sddmm_plan)
    x = torch.randn(2, 10)
    torch.testing.assert_close(dst(x), src(x))
    sd = src.state_dict()
    bad = dict(sd, values=sd["values"][:3])
    with pytest.raises(RuntimeError, match="different lengths"):
        dst.load_state_dict(bad)
    bad = dict(sd, indices=sd["indices"].flip(0))
    with pytest.raises(RuntimeError, match="sorted"):
        dst.load_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k != "values"}
    bad["indices"] = sd["indices"][:2]
    with pytest.raises(RuntimeError, match="needs both"):
        dst.load_state_dict(bad, strict=False)
    # a plain nn.Linear's state_dict loads into the layer's weight/bias (deltas reported missing)
    lin = nn.Linear(10, 8)
    res = dst.load_state_dict(lin.state_dict(), strict=False)
    assert set(res.missing_keys) == {"indices", "values"} and torch.equal(dst.weight, lin.weight)


def test_autocast_cpu():
    layer = _layer(16, 8, True, torch.float32)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32


def test_module_to_and_deepcopy():
    import copy

    layer = _layer(8, 6, True, torch.float32, k=5)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.indices, layer.indices) and clone.values is not layer.values
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.indices.dtype == torch.int32
    x = torch.randn(2, 8)
    torch.testing.assert_close(clone(x), _dense_reference(clone)(x))


def _bnb_linear4bit(in_f, out_f, bias=True, dtype=torch.float32, double_quant=True, seed=0):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, compress_statistics=double_quant,
                            quant_type="nf4")
    lin.weight.data = lin.weight.data.to(dtype)
    try:
        return lin.to("cpu")  # bitsandbytes quantizes on the move to the device
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {exc}")


@pytest.mark.parametrize("double_quant", [True, False])
def test_from_bnb_linear4bit(double_quant):
    import bitsandbytes.functional as bf

    lin = _bnb_linear4bit(64, 24, double_quant=double_quant)
    keys = set(lin.state_dict())
    packed_ptr = lin.weight.data_ptr()
    layer = SparseDeltaLinear.from_linear(lin, num_deltas=50, generator=_gen(0))
    assert layer.weight is lin.weight and layer.is_quantized and "nf4(bnb)" in repr(layer)
    assert layer.compute_weight.packed.data_ptr() == packed_ptr  # used as is, no re-quantization
    assert set(layer.state_dict()) == keys | {"indices", "values"}
    with torch.no_grad():
        layer.values.normal_(generator=_gen(1))
    ref = bf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float().view(-1).clone()
    ref[layer.indices.long()] += layer.values.detach()
    ref = ref.view(24, 64).requires_grad_(True)
    x = torch.randn(2, 3, 64, generator=_gen(2), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, ref, lin.bias.detach())
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.values.grad, ref.grad.view(-1)[layer.indices.long()], atol=1e-4, rtol=1e-4)
    # state_dict round trip into another bnb-based layer (strict: the quant-state keys are consumed)
    other = SparseDeltaLinear.from_linear(_bnb_linear4bit(64, 24, double_quant=double_quant, seed=5), num_deltas=7)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x.detach()), y.detach())
    layer.to("cpu")  # the NF4 view is rebuilt after a move
    torch.testing.assert_close(layer(x.detach()), y.detach())


def test_bnb_linear4bit_errors():
    bnb = pytest.importorskip("bitsandbytes")
    raw = bnb.nn.Linear4bit(64, 8, quant_type="nf4")  # never moved: not quantized
    with pytest.raises(ValueError, match="not quantized"):
        SparseDeltaLinear.from_linear(raw, num_deltas=3)
    fp4 = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="NF4"):
        SparseDeltaLinear.from_linear(fp4, num_deltas=3)


def test_bnb_cpu_repacked_weight_is_unpacked():
    # bitsandbytes' CPU inference (eval, no grad, AVX512-BF16) repacks the weight on its first forward;
    # from_linear must undo that (with bitsandbytes' own inverse) before viewing it as NF4
    lin = _bnb_linear4bit(64, 32, dtype=torch.bfloat16)
    x = torch.randn(3, 64, generator=_gen(0)).to(torch.bfloat16)
    lin.train()
    with torch.no_grad():
        y_train = lin(x)
    lin.eval()
    with torch.no_grad():
        lin(x)
    layer = SparseDeltaLinear.from_linear(lin, num_deltas=10)
    torch.testing.assert_close(layer(x), y_train, atol=2e-2, rtol=2e-2)


def test_nf4weight_layer_survives_dtype_cast():
    nf4 = NF4Weight.quantize(torch.randn(8, 64, generator=_gen(0)), double_quant=True, dtype=torch.float32)
    layer = SparseDeltaLinear.from_linear(nf4, num_deltas=30, bias=torch.zeros(8), generator=_gen(1))
    with torch.no_grad():
        layer.values.normal_(generator=_gen(2))
    x = torch.randn(3, 64, generator=_gen(3))
    y = layer(x)
    absmax = nf4.absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.uint8 and layer.weight_nested_absmax.dtype == torch.float32
    assert torch.equal(layer.weight_absmax, absmax) and layer.compute_weight.dtype == torch.bfloat16
    assert layer.values.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x.bfloat16()).float(), y, atol=5e-2, rtol=5e-2)
    assert set(layer.state_dict()) == {"bias", "weight_packed", "weight_absmax", "weight_nested_absmax",
                                       "weight_nested_code", "indices", "values"}


def test_forward_bad_input_errors():
    layer = SparseDeltaLinear(12, 8, num_deltas=10)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 11))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        layer([[0.0] * 12])
