"""torch.compile(fullgraph=True) over models with SparseDeltaLinear layers: forward and backward, no graph break.

The default run uses the ``aot_eager`` backend (full Dynamo + AOTAutograd tracing, fake tensors, the ops'
``register_fake``; fast); ``inductor`` (C++ codegen on CPU) is marked slow.
"""
import pytest
import torch
import torch.nn as nn

import spiel.nn as snn
from spiel.nn import SparseDeltaLinear
from spiel.quant import NF4Weight


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.mid = nn.Linear(32, 32, bias=False)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _model(seed=0):
    torch.manual_seed(seed)
    m = MLP()
    snn.inject(m, ["up", "mid", "down"], density=0.2, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in snn.sparse_delta_modules(m).values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.1)
    return m


def _step(model, x, fn=None):
    model.zero_grad(set_to_none=True)
    y = (fn if fn is not None else model)(x)
    (y * y).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_compiled(model, x, backend):
    y_ref, g_ref = _step(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for _ in range(2):  # second call: no recompilation problems
        y, g = _step(model, x, compiled)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        assert g.keys() == g_ref.keys() and g
        for n in g:
            torch.testing.assert_close(g[n], g_ref[n], atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_aot_eager():
    model = _model()
    _check_compiled(model, torch.randn(2, 3, 16), "aot_eager")


def test_compile_fullgraph_nf4_and_candidates():
    model = _model(seed=2)
    model.mid = SparseDeltaLinear.from_linear(NF4Weight.quantize(torch.randn(32, 32), dtype=torch.float32),
                                              num_deltas=50, bias=torch.zeros(32))
    layer = model.up
    free = sorted(set(range(16 * 32)) - set(layer.indices.tolist()))
    layer.set_candidates(torch.tensor(free[:20]))
    x = torch.randn(5, 16)
    _check_compiled(model, x, "aot_eager")
    assert layer.candidate_values.grad is not None and layer.candidate_values.grad.abs().sum() > 0


def test_compile_after_set_indices():
    model = _model(seed=3)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _step(model, x, compiled)
    layer = model.up
    layer.set_indices(torch.arange(0, 512, 3))  # new k: a recompilation, still one graph
    y, g = _step(model, x, compiled)
    y_ref, g_ref = _step(model, x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g["up.values"], g_ref["up.values"])


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled(_model(), torch.randn(2, 3, 16), "inductor")


@pytest.mark.slow
def test_compile_llama_fullgraph():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    snn.inject(model, ["q_proj", "v_proj", "up_proj", "down_proj"], density=0.05)
    ids = torch.randint(0, 128, (2, 8))
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
