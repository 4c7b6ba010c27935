"""SparseDeltaLinear and model integration on CUDA: every available backend, bitsandbytes Linear4bit and a
transformers model loaded with BitsAndBytesConfig(load_in_4bit=True), no host sync, no merged weight kept."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spiel
import spiel.nn as snn
import spiel.ops as ops
from spiel.nn import SparseDeltaLinear

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
BACKENDS = ["torch", "triton", "cuda"]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _use(backend):
    info = ops.backend_info()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend!r} unavailable: {info['reason']}")
    return ops.use_backend(backend)


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _reference(layer, x, g):
    """fp32 dense computation of y and the gradients (input, values, bias)."""
    w = (layer.merged_weight(torch.float32) if layer.is_quantized else layer.weight.float()).clone()
    if not layer.is_quantized:
        w.view(-1)[layer.indices.long()] += layer.values.detach().float()
    w.requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().float().requires_grad_(True)
    y = F.linear(x32, w, b)
    y.backward(g.float())
    return y, x32.grad, w.grad.view(-1)[layer.indices.long()], None if b is None else b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(33, 17), (256, 384), (1024, 4096)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_dense(backend, dtype, shape, bias):
    in_f, out_f = shape
    torch.manual_seed(0)
    layer = SparseDeltaLinear(in_f, out_f, bias=bias, density=0.01, device=DEV, dtype=dtype)
    with torch.no_grad():
        layer.values.normal_(generator=_gen(1))
    x = torch.randn(3, 41, in_f, device=DEV, generator=_gen(2)).to(dtype).requires_grad_(True)
    g = torch.randn(3, 41, out_f, device=DEV, generator=_gen(3)).to(dtype)
    with _use(backend):
        y = layer(x)
        y.backward(g)
    y_ref, gx_ref, gv_ref, gb_ref = _reference(layer, x, g)
    scale = max(1.0, in_f / 256)
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(x.grad.float(), gx_ref, **tol)
    torch.testing.assert_close(layer.values.grad, gv_ref, atol=1e-3 * scale * 10, rtol=1e-2)
    if bias:
        torch.testing.assert_close(layer.bias.grad.float(), gb_ref, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward_backward(backend):
    torch.manual_seed(0)
    layer = SparseDeltaLinear(512, 768, density=0.02, device=DEV, dtype=torch.bfloat16)
    free = torch.ones(512 * 768, dtype=torch.bool, device=DEV)
    free[layer.indices.long()] = False
    layer.set_candidates(free.nonzero().view(-1)[::997])
    x = torch.randn(64, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with _use(backend):
        layer(x).float().sum().backward()  # warm-up (compilation, caches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = layer(x)
            y.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_forward_keeps_no_merged_weight():
    torch.manual_seed(0)
    out_f, in_f = 4096, 4096
    layer = SparseDeltaLinear(in_f, out_f, density=0.01, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(256, in_f, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    kept = torch.cuda.memory_allocated() - before
    merged_bytes = out_f * in_f * 2
    assert kept < merged_bytes // 4, f"{kept} bytes kept after forward (merged weight is {merged_bytes})"
    y.sum().backward()


# --------------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_linear4bit_layer(backend, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(512, 256, bias=True, compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                            quant_type="nf4")
    lin.weight.data = lin.weight.data.to(torch.bfloat16)
    lin = lin.to(DEV)
    layer = SparseDeltaLinear.from_linear(lin, density=0.02)
    assert layer.compute_weight.packed.data_ptr() == lin.weight.data_ptr()
    with torch.no_grad():
        layer.values.normal_(generator=_gen(4))
    x = torch.randn(2, 33, 512, device=DEV, generator=_gen(5)).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(2, 33, 256, device=DEV, generator=_gen(6)).to(torch.bfloat16)
    with _use(backend):
        y = layer(x)
        y.backward(g)
    dq = bf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float().view(-1).clone()
    dq[layer.indices.long()] += layer.values.detach()
    w = dq.view(256, 512).requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    y_ref = F.linear(x32, w, lin.bias.detach().float())
    y_ref.backward(g.float())
    torch.testing.assert_close(y.float(), y_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(x.grad.float(), x32.grad, **TOL[torch.bfloat16])
    torch.testing.assert_close(layer.values.grad, w.grad.view(-1)[layer.indices.long()], atol=5e-2, rtol=2e-2)


def _tiny_llama_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def _load_4bit(path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0},
                                                         dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_hf_4bit_model_train_save_load(tmp_path, backend):
    path = _tiny_llama_dir(tmp_path / "model")
    model = _load_4bit(path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ctx = ops.use_backend("auto") if backend == "auto" else _use(backend)
    with ctx:
        got = snn.inject(model, targets, num_tunable=50_000)
        assert len(got) == 14 and all(l._base_kind == "bnb" for l in got.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable()
        ids = torch.randint(0, 128, (4, 64), device=DEV, generator=_gen(7))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        model.train()
        for _ in range(8):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        spiel.save_deltas(model, tmp_path / "d.safetensors")
        fresh = _load_4bit(path).eval()
        spiel.load_deltas(fresh, tmp_path / "d.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=0, atol=0)
        # merge: dequantized bf16 + delta; outputs agree; unmerge restores the NF4 layers
        merged = snn.merge(model)
        assert all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in merged.values())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=5e-2, rtol=5e-2)
        snn.unmerge(model)
        snn.restore(model)
        assert not snn.sparse_delta_modules(model)


def test_bf16_model_merge_unmerge_exact():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    snn.inject(model, None, density=0.01)
    with torch.no_grad():
        for layer in snn.sparse_delta_modules(model).values():
            layer.values.normal_(std=0.01)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    snn.merge(model)
    snn.unmerge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_model_to_device_rebuilds_nf4_view():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.bfloat16).to(DEV)
    model = nn.Sequential(lin)
    snn.inject(model, ["0"], density=0.05)
    x = torch.randn(4, 128, device=DEV, dtype=torch.bfloat16)
    y = model(x)
    model.cpu()
    assert model[0].compute_weight.device.type == "cpu"
    model.to(DEV)
    assert model[0].compute_weight.device.type == "cuda"
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_inductor_cuda(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(DEV, torch.bfloat16)
    snn.inject(model, ["0", "2"], density=0.02)
    ref = copy.deepcopy(model)
    x = torch.randn(8, 256, device=DEV, dtype=torch.bfloat16)
    with _use(backend):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        compiled(x).float().square().sum().backward()
        ref(x).float().square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad.float(), q.grad.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_train_merged_matches_unmerged_cuda(backend, dtype):
    """merge_(train=True) on CUDA: bit-identical outputs and gradients (values, candidates, input) to the
    unmerged layer on every backend, across an update of values, an index change and unmerge."""
    with _use(backend):
        g = _gen(3)
        a = SparseDeltaLinear(1000, 700, density=0.02, dtype=dtype, device=DEV, generator=g)
        with torch.no_grad():
            a.values.normal_(generator=g).mul_(0.1)
        original = a.weight.detach().clone()
        b = copy.deepcopy(a)
        b.merge_(train=True)
        free = torch.ones(700 * 1000, dtype=torch.bool, device=DEV)
        free[a.indices.long()] = False
        cand = free.nonzero().view(-1)[::97][:300]
        for layer in (a, b):
            layer.set_candidates(cand)
        for step in range(2):
            x = torch.randn(3, 50, 1000, dtype=dtype, device=DEV, generator=g)
            res = []
            for layer in (a, b):
                xi = x.clone().requires_grad_()
                y = layer(xi)
                y.float().square().sum().backward()
                res.append((y, xi.grad, layer.values.grad, layer.candidate_values.grad))
            for u, v in zip(*res):
                assert torch.equal(u, v)
            with torch.no_grad():
                for layer in (a, b):
                    layer.values.sub_(1e-3 * layer.values.grad)
                    layer.values.grad = None
                    layer.candidate_values.grad = None
        for layer in (a, b):
            layer.clear_candidates()
            idx = torch.cat([layer.indices.long()[10:], cand[:10]]).sort().values
            layer.set_indices(idx)
        x = torch.randn(7, 1000, dtype=dtype, device=DEV, generator=g)
        assert torch.equal(a(x), b(x))
        b.unmerge_()
        assert torch.equal(b.weight, original)


@pytest.mark.parametrize("stop", [3, 4])  # after the probe (positions deferred), inside the window
def test_ag_deferred_candidates_cuda_pinned_and_resume(stop):
    """candidates_per_slot=1 on CUDA: the probe's positions go to pinned host memory by an async copy (no
    candidates installed on the layers), regrow at the update, and a checkpoint taken while they are pending
    resumes bit-identically (state_dict waits for the copies)."""
    import io

    from spiel.optim import SparseAdamW
    from spiel.scheduler import SpielScheduler

    def build(seed):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = nn.Sequential(SparseDeltaLinear(96, 80, num_deltas=300, generator=g), nn.Tanh(),
                            SparseDeltaLinear(80, 24, num_deltas=120, generator=g)).to(DEV)
        opt = SparseAdamW(net, lr=0.05)
        sched = SpielScheduler(net, opt, "ag", total_steps=40, reselection_steps=6, accumulation_steps=3,
                               drop_fraction=0.4)
        return net, opt, sched

    def train(net, opt, sched, steps, seen=None):
        for s in steps:
            gx = torch.Generator(device=DEV).manual_seed(100 + s)
            x = torch.randn(32, 96, device=DEV, generator=gx)
            net(x).pow(2).mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            if seen is not None and sched._deferred is not None:
                seen.append([p.is_pinned() and p.device.type == "cpu" for p in sched._deferred["positions"]]
                            + [m.candidates is None for m in (net[0], net[2])])

    net, opt, sched = build(0)
    seen = []
    train(net, opt, sched, range(14), seen)
    assert seen and all(all(row) for row in seen)
    ref = [net[0].indices.clone(), net[2].indices.clone()]
    assert sched.last_update  # the second update (step 12) regrew

    net1, opt1, sched1 = build(0)
    train(net1, opt1, sched1, range(stop))
    assert sched1._deferred is not None
    buf = io.BytesIO()
    torch.save({"model": net1.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    net2, opt2, sched2 = build(1)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(net2, opt2, sched2, range(stop, 14))
    assert torch.equal(net2[0].indices, ref[0]) and torch.equal(net2[2].indices, ref[1])
