"""spiel.nn.inject / restore / merge / unmerge / merged_state_dict on small models and a tiny LLaMA."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import spiel.nn as snn
from spiel.nn import SparseDeltaLinear


class Block(nn.Module):
    def __init__(self, d=24, h=40):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(self.norm(x))))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class Toy(nn.Module):
    def __init__(self, d=24, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def toy(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def randomize_deltas(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in snn.sparse_delta_modules(model).values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.05)


def tiny_llama(seed=0, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def test_target_forms():
    names = lambda d: sorted(d)  # noqa: E731
    m = toy()
    got = snn.inject(m, ["q_proj", "layers.1.v_proj"], density=0.1)
    assert names(got) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert all(isinstance(v, SparseDeltaLinear) for v in got.values())
    assert m.layers[0].q_proj is got["layers.0.q_proj"]
    m = toy()
    got = snn.inject(m, r"layers\.\d+\.(up|down)_proj", density=0.1)
    assert names(got) == ["layers.0.down_proj", "layers.0.up_proj", "layers.1.down_proj", "layers.1.up_proj"]
    m = toy()
    got = snn.inject(m, lambda n, mod: mod.out_features == 40, density=0.1)
    assert names(got) == ["layers.0.up_proj", "layers.1.up_proj"]
    for target in (None, "all-linear"):
        m = toy()
        got = snn.inject(m, target, density=0.1)
        assert len(got) == 8 and "lm_head" not in got  # output embedding excluded by default
    m = toy()
    assert "lm_head" in snn.inject(m, ["lm_head"], density=0.1)


def test_shares_weights_and_freezes():
    m = toy()
    before = {n: p for n, p in m.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in before.items()}
    got = snn.inject(m, ["q_proj", "up_proj"], density=0.2)
    for name, layer in got.items():
        assert layer.weight is before[name + ".weight"] and layer.weight.data_ptr() == ptrs[name + ".weight"]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(n + ".values" for n in got)
    m2 = toy()
    snn.inject(m2, ["q_proj"], density=0.2, freeze=False)
    assert m2.embed.weight.requires_grad and m2.layers[0].v_proj.weight.requires_grad
    assert not m2.layers[0].q_proj.weight.requires_grad


def test_budget_num_tunable_exact_and_proportional():
    m = toy()
    got = snn.inject(m, ["q_proj", "v_proj", "up_proj", "down_proj"], num_tunable=1001)
    counts = {n: l.num_deltas for n, l in got.items()}
    assert sum(counts.values()) == 1001
    total = sum(l.in_features * l.out_features for l in got.values())
    for n, l in got.items():
        assert abs(counts[n] - 1001 * l.in_features * l.out_features / total) < 1
    assert snn.split_budget(10, [10, 10, 10]) == [4, 3, 3]
    assert snn.split_budget(7, [5, 2]) == [5, 2]
    assert snn.split_budget(0, [3, 4]) == [0, 0]
    with pytest.raises(ValueError, match="more than"):
        snn.inject(toy(), ["q_proj"], num_tunable=24 * 24 * 2 + 1)


def test_budget_density_and_counts():
    m = toy()
    got = snn.inject(m, ["up_proj"], density=0.25)
    assert all(l.num_deltas == 240 for l in got.values())
    m = toy()
    got = snn.inject(m, ["q_proj"], num_deltas=5)
    assert [l.num_deltas for l in got.values()] == [5, 5]
    m = toy()
    got = snn.inject(m, num_deltas={"layers.0.q_proj": 3, "layers.1.down_proj": 11})
    assert {n: l.num_deltas for n, l in got.items()} == {"layers.0.q_proj": 3, "layers.1.down_proj": 11}


def test_inject_seeded():
    a, b, c = toy(), toy(), toy()
    ia = snn.inject(a, ["q_proj"], density=0.1, seed=3)
    ib = snn.inject(b, ["q_proj"], density=0.1, seed=3)
    ic = snn.inject(c, ["q_proj"], density=0.1, seed=4)
    assert all(torch.equal(ia[n].indices, ib[n].indices) for n in ia)
    assert not all(torch.equal(ia[n].indices, ic[n].indices) for n in ia)


def test_inject_errors():
    with pytest.raises(ValueError, match="matches no"):
        snn.inject(toy(), ["k_proj"], density=0.1)
    with pytest.raises(ValueError, match="fullmatch"):
        snn.inject(toy(), "q_proj", density=0.1)  # a regex against the full name
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        snn.inject(toy(), ["q_proj"], density=0.0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        snn.inject(toy(), ["q_proj"], density=1.01)
    with pytest.raises(ValueError, match="exactly one"):
        snn.inject(toy(), ["q_proj"], density=0.1, num_tunable=10)
    with pytest.raises(ValueError, match="exactly one"):
        snn.inject(toy(), ["q_proj"])
    with pytest.raises(ValueError, match="more than"):
        snn.inject(toy(), ["q_proj"], num_deltas=24 * 24 + 1)
    with pytest.raises(ValueError, match="no count"):
        snn.inject(toy(), ["q_proj"], num_deltas={"layers.0.q_proj": 3})
    with pytest.raises(ValueError, match="not targeted"):
        snn.inject(toy(), num_deltas={"layers.0.q_proj": 3, "layers.9.q_proj": 3})
    with pytest.raises(TypeError, match="target_modules"):
        snn.inject(toy(), 42, density=0.1)
    m = toy()
    snn.inject(m, ["q_proj"], density=0.1)
    with pytest.raises(ValueError, match="already injected"):
        snn.inject(m, ["q_proj"], density=0.1)
    # nothing was replaced by a failing call
    m = toy()
    with pytest.raises(ValueError):
        snn.inject(m, ["q_proj"], num_deltas={"layers.0.q_proj": 3, "layers.1.q_proj": 10**6})
    assert not snn.sparse_delta_modules(m)


def test_restore():
    m = toy()
    originals = {n: mod for n, mod in m.named_modules()}
    y0 = m(IDS)
    got = snn.inject(m, ["q_proj", "v_proj", "lm_head"], density=0.2)
    randomize_deltas(m)
    assert not torch.allclose(m(IDS), y0)
    back = snn.restore(m)
    assert set(back) == set(got)
    for n, mod in back.items():
        assert mod is originals[n] and m.get_submodule(n) is originals[n]
    assert not snn.sparse_delta_modules(m)
    assert all(p.requires_grad for p in m.parameters())
    torch.testing.assert_close(m(IDS), y0, rtol=0, atol=0)


def test_merge_unmerge_bf16_exact():
    m = toy(dtype=torch.bfloat16)
    snn.inject(m, None, density=0.3)
    randomize_deltas(m)
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    y = m(IDS)
    merged = snn.merge(m)
    assert len(merged) == 8 and all(l.merged for l in merged.values())
    for name, layer in merged.items():
        assert torch.equal(layer.weight, layer.merged_weight())
        assert layer.merge_saved.numel() == layer.num_deltas  # O(k) memory
    torch.testing.assert_close(m(IDS), y)
    back = snn.unmerge(m)
    assert set(back) == set(merged)
    for n, p in m.named_parameters():
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(m(IDS), y, rtol=0, atol=0)


def test_merged_state_dict_exports_plain_model():
    m = toy()
    plain_keys = set(toy().state_dict())
    snn.inject(m, ["q_proj", "v_proj", "up_proj", "lm_head"], density=0.3)
    randomize_deltas(m)
    y = m(IDS)
    sd = snn.merged_state_dict(m)
    assert set(sd) == plain_keys
    assert snn.sparse_delta_modules(m)  # model untouched
    fresh = toy(seed=5)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(IDS), y, atol=1e-5, rtol=1e-5)
    snn.merge(m)  # also while merged
    assert all(torch.equal(v, sd[k]) for k, v in snn.merged_state_dict(m).items())


def test_state_dict_of_injected_model_roundtrip():
    a = toy()
    snn.inject(a, ["q_proj", "up_proj"], density=0.1, seed=1)
    randomize_deltas(a)
    b = toy(seed=3)
    snn.inject(b, ["q_proj", "up_proj"], density=0.2, seed=2)  # other k: resized on load
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(IDS), a(IDS), rtol=0, atol=0)


def test_tied_and_shared_modules():
    m = toy()
    shared = m.layers[0].q_proj
    m.layers[1].q_proj = shared  # one module under two names
    got = snn.inject(m, ["q_proj"], density=0.1)
    assert len(got) == 1 and m.layers[0].q_proj is m.layers[1].q_proj
    snn.restore(m)
    assert m.layers[0].q_proj is shared and m.layers[1].q_proj is shared


# --------------------------------------------------------------------------------------------------------
# NF4 (bitsandbytes Linear4bit on CPU)
# --------------------------------------------------------------------------------------------------------
def to_linear4bit(model, dtype=torch.float32):
    """Replace every nn.Linear under model.layers by a bitsandbytes Linear4bit (quantized on CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not getattr(model, "lm_head", None):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to(dtype).clone(), requires_grad=False,
                                             quant_type="nf4", module=q)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone())
                setattr(parent, name, q.to("cpu"))
    return model


def test_nf4_model_inject_merge_unmerge_requantize():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    m = to_linear4bit(toy())
    got = snn.inject(m, ["q_proj", "v_proj", "up_proj", "down_proj"], density=0.2)
    assert all(l.is_quantized and l._base_kind == "bnb" for l in got.values())
    randomize_deltas(m)
    y = m(IDS)
    merged = snn.merge(m)
    for name, mod in merged.items():
        assert type(mod) is nn.Linear and not mod.weight.requires_grad
        layer = got[name]
        ref = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().view(-1).clone()
        ref[layer.indices.long()] += layer.values.detach()
        assert torch.equal(mod.weight, ref.view_as(mod.weight))
        assert mod.bias is layer.bias
    torch.testing.assert_close(m(IDS), y, atol=1e-5, rtol=1e-5)
    sd = snn.merged_state_dict(m)
    assert not any(k.endswith((".indices", ".values", ".absmax")) for k in sd)
    back = snn.unmerge(m)
    assert all(back[n] is got[n] for n in got) and m.layers[0].q_proj is got["layers.0.q_proj"]
    torch.testing.assert_close(m(IDS), y, rtol=0, atol=0)
    # merged_state_dict straight from the NF4 layers: dense W + delta, plain keys
    sd2 = snn.merged_state_dict(m)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.warns(UserWarning, match="second"):
        requant = snn.merge(m, requantize=True)
    assert all(isinstance(mod, bnb.nn.Linear4bit) for mod in requant.values())
    torch.testing.assert_close(m(IDS), y, atol=0.3, rtol=0.1)
    snn.unmerge(m)
    torch.testing.assert_close(m(IDS), y, rtol=0, atol=0)
    back = snn.restore(m)
    assert all(isinstance(mod, bnb.nn.Linear4bit) for mod in back.values())


def test_nf4_spiel_weight_requantize():
    from spiel.quant import NF4Weight

    m = nn.Sequential(nn.Linear(32, 16))
    m[0] = SparseDeltaLinear.from_linear(NF4Weight.quantize(torch.randn(16, 32), dtype=torch.float32),
                                         num_deltas=20, bias=torch.zeros(16))
    randomize_deltas(m)
    x = torch.randn(3, 32)
    y = m(x)
    snn.merge(m)
    assert type(m[0]) is nn.Linear
    torch.testing.assert_close(m(x), y)
    snn.unmerge(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        snn.merge(m, requantize=True)
    assert any("second" in str(x.message) for x in w)
    assert isinstance(m[0], SparseDeltaLinear) and m[0].num_deltas == 0 and m[0].is_quantized


# --------------------------------------------------------------------------------------------------------
# tiny LLaMA (transformers), built from a config: no download
# --------------------------------------------------------------------------------------------------------
def _train(model, ids, steps, lr=3e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


LLAMA_IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("reentrant", [False, True])
def test_llama_trains_with_gradient_checkpointing(reentrant):
    model = tiny_llama()
    got = snn.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     num_tunable=20_000)
    assert len(got) == 14 and sum(l.num_deltas for l in got.values()) == 20_000
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(n + ".values" for n in got)
    # the gradients with checkpointing equal those without
    ref = copy.deepcopy(model)
    randomize_deltas(model)
    randomize_deltas(ref)
    ref(input_ids=LLAMA_IDS, labels=LLAMA_IDS).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(input_ids=LLAMA_IDS, labels=LLAMA_IDS).loss.backward()
    for name, layer in got.items():
        other = ref.get_submodule(name)
        assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
        torch.testing.assert_close(layer.values.grad, other.values.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)
    losses = _train(model, LLAMA_IDS, 8)
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a + 1e-3 for a, b in zip(losses, losses[1:])), losses


def test_llama_bf16_trains():
    model = tiny_llama(dtype=torch.bfloat16)
    snn.inject(model, ["q_proj", "v_proj", "up_proj", "down_proj"], density=0.05)
    losses = _train(model, LLAMA_IDS, 6)
    assert losses[-1] < losses[0], losses


def test_llama_hf_4bit_cpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map="cpu",
                                                              dtype=torch.bfloat16)
    except Exception as exc:  # pragma: no cover - depends on the transformers/bitsandbytes build
        pytest.skip(f"4-bit loading on CPU is not supported here: {exc}")
    got = snn.inject(model, ["q_proj", "v_proj", "up_proj", "down_proj"], density=0.05)
    assert all(l._base_kind == "bnb" for l in got.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    losses = _train(model, LLAMA_IDS, 6)
    assert losses[-1] < losses[0], losses
    layer = next(iter(got.values()))
    assert layer.values.abs().sum() > 0
    snn.restore(model)
    assert not snn.sparse_delta_modules(model)
