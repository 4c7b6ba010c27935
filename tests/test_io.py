"""spiel.save_deltas / spiel.load_deltas."""
import json

import pytest
import torch
import torch.nn as nn

import spiel
import spiel.nn as snn
from spiel.nn import SparseDeltaLinear

from test_inject import IDS, LLAMA_IDS, Toy, _train, randomize_deltas, tiny_llama, toy


def _train_toy(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def test_exports():
    assert spiel.save_deltas is snn.save_deltas and spiel.load_deltas is snn.load_deltas
    assert "save_deltas" in spiel.__all__ and "load_deltas" in spiel.__all__


def test_file_layout(tmp_path):
    from safetensors import safe_open

    m = toy()
    got = snn.inject(m, ["q_proj", "up_proj"], density=0.1)
    randomize_deltas(m)
    path = tmp_path / "deltas.safetensors"
    spiel.save_deltas(m, path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == {f"{n}.{p}" for n in got for p in ("indices", "values")}  # nothing else of the model
    cfg = json.loads(meta["spiel"])
    assert cfg["spiel_version"] == spiel.__version__ and cfg["format"] == "spiel-deltas"
    assert cfg["modules"]["layers.0.up_proj"] == {"shape": [40, 24], "num_deltas": 96, "values_dtype": "float32",
                                                  "quantized": False}
    config, tensors = snn.read_deltas(path)
    assert torch.equal(tensors["layers.1.q_proj.values"], got["layers.1.q_proj"].values.detach())


@pytest.mark.parametrize("preinject", [False, True])
def test_train_save_load_identical(tmp_path, preinject):
    m = toy()
    snn.inject(m, ["q_proj", "v_proj", "down_proj"], num_tunable=500, values_dtype=torch.float32)
    _train_toy(m)
    y = m(IDS)
    path = tmp_path / "d.safetensors"
    spiel.save_deltas(m, path)
    fresh = toy()  # the same base weights
    if preinject:  # injected with other counts and indices: resized and overwritten
        snn.inject(fresh, ["q_proj", "v_proj", "down_proj"], density=0.5, seed=7)
    loaded = spiel.load_deltas(fresh, path)
    assert sorted(loaded) == sorted(snn.sparse_delta_modules(m))
    for name, layer in loaded.items():
        src = m.get_submodule(name)
        assert isinstance(layer, SparseDeltaLinear) and fresh.get_submodule(name) is layer
        assert torch.equal(layer.indices, src.indices) and torch.equal(layer.values, src.values)
        assert torch.equal(layer.sddmm_plan, src.sddmm_plan)
    torch.testing.assert_close(fresh(IDS), y, rtol=0, atol=0)
    # auto-injection froze the rest like inject does
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(n + ".values" for n in loaded)


def test_auto_inject_keeps_values_dtype_and_freeze_flag(tmp_path):
    m = toy()
    snn.inject(m, ["q_proj"], density=0.2, values_dtype=torch.bfloat16)
    randomize_deltas(m)
    spiel.save_deltas(m, tmp_path / "d.safetensors")
    fresh = toy()
    loaded = spiel.load_deltas(fresh, tmp_path / "d.safetensors", freeze=False)
    assert all(l.values.dtype == torch.bfloat16 for l in loaded.values())
    assert fresh.embed.weight.requires_grad
    torch.testing.assert_close(fresh(IDS), m(IDS), rtol=0, atol=0)


def test_load_errors(tmp_path):
    m = toy()
    snn.inject(m, ["q_proj", "up_proj"], density=0.1)
    path = tmp_path / "d.safetensors"
    spiel.save_deltas(m, path)

    class Other(Toy):
        pass

    wide = Other()
    wide.layers[1].up_proj = nn.Linear(24, 41)
    with pytest.raises(ValueError, match=r"layers\.1\.up_proj.*shape"):
        spiel.load_deltas(wide, path)
    assert not snn.sparse_delta_modules(wide)  # nothing changed
    missing = toy()
    del missing.layers[1].q_proj
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj.*not in the model"):
        spiel.load_deltas(missing, path)
    extra = toy()
    snn.inject(extra, ["q_proj", "up_proj", "v_proj"], density=0.1)
    with pytest.raises(ValueError, match=r"layers\.0\.v_proj"):
        spiel.load_deltas(extra, path)
    spiel.load_deltas(extra, path, strict=False)
    not_linear = toy()
    not_linear.layers[0].q_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*Identity"):
        spiel.load_deltas(not_linear, path)
    # not a spiel file
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a spiel deltas file"):
        spiel.load_deltas(toy(), tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        spiel.load_deltas(toy(), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        spiel.load_deltas(toy(), tmp_path / "absent.safetensors")
    # corrupted indices
    config, tensors = snn.read_deltas(path)
    tensors["layers.0.q_proj.indices"] = tensors["layers.0.q_proj.indices"].flip(0).contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"spiel": json.dumps(config)})
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*sorted"):
        spiel.load_deltas(toy(), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        spiel.save_deltas(toy(), tmp_path / "none.safetensors")


def test_llama_train_save_load(tmp_path):
    model = tiny_llama()
    snn.inject(model, ["q_proj", "v_proj", "gate_proj", "down_proj"], num_tunable=5000)
    _train(model, LLAMA_IDS, 3)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=LLAMA_IDS).logits
    spiel.save_deltas(model, tmp_path / "llama.safetensors")
    fresh = tiny_llama().eval()
    spiel.load_deltas(fresh, tmp_path / "llama.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=LLAMA_IDS).logits, logits, rtol=0, atol=0)


def test_merged_models(tmp_path):
    m = toy()
    snn.inject(m, ["q_proj"], density=0.2)
    randomize_deltas(m)
    y = m(IDS)
    snn.merge(m)
    spiel.save_deltas(m, tmp_path / "d.safetensors")  # the deltas, also while merged
    with pytest.raises(ValueError, match="merged"):
        spiel.load_deltas(m, tmp_path / "d.safetensors")
    fresh = toy()
    spiel.load_deltas(fresh, tmp_path / "d.safetensors")
    torch.testing.assert_close(fresh(IDS), y, rtol=0, atol=0)
