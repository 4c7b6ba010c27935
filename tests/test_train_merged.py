"""Training merged (``SparseDeltaLinear.merge_(train=True)``): W + delta stays in the weight's storage, each
forward refreshes the k merged entries, and the op runs no merge. Everything a training run observes must be
bit-identical to the unmerged layer: outputs, input and delta gradients (candidates too), optimizer steps,
index updates by the scheduler, gradient checkpointing, state_dict; unmerge restores W exactly."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import spiel.ops as ops
import spiel.nn as snn
from spiel.nn import SparseDeltaLinear
from spiel.optim import SM3, SparseAdamW
from spiel.scheduler import SpielScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(dtype, values_dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = SparseDeltaLinear(37, 29, bias=bias, density=0.1, dtype=dtype, values_dtype=values_dtype, generator=g)
    with torch.no_grad():
        a.values.copy_(torch.randn(a.num_deltas, generator=g).to(values_dtype) * 0.5)
    b = copy.deepcopy(a)
    b.merge_(train=True)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_identical(dtype, values_dtype):
    a, b = _pair(dtype, values_dtype)
    original = a.weight.detach().clone()
    assert b.merged and b.train_merged and "training" in repr(b)
    for step in range(3):
        x = torch.randn(5, 3, 37, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        assert torch.equal(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad)
        assert torch.equal(a.values.grad, b.values.grad)
        assert torch.equal(a.bias.grad, b.bias.grad)
        with torch.no_grad():  # an optimizer-like update between steps: the next forward must see it
            for layer in (a, b):
                layer.values.sub_(0.1 * layer.values.grad.to(layer.values.dtype))
                layer.values.grad = None
                layer.bias.grad = None
    # the merged weight is W + delta of the current values; unmerge gives W back bit for bit
    assert torch.equal(b.merged_weight(), a.merged_weight())
    b.unmerge_()
    assert not b.merged and not b.train_merged
    assert torch.equal(b.weight, original)


def test_candidates_and_checkpointing_identical():
    a, b = _pair(torch.bfloat16)
    cand = torch.tensor(sorted(set(range(0, 29 * 37, 7)) - set(a.indices.tolist())))[:40]
    for layer in (a, b):
        layer.set_candidates(cand)
    x = torch.randn(6, 37, dtype=torch.bfloat16)
    outs = []
    for layer in (a, b):
        y = checkpoint(layer, x.clone().requires_grad_(), use_reentrant=False)
        y.float().pow(2).sum().backward()
        outs.append((y, layer.values.grad, layer.candidate_values.grad))
    for u, v in zip(*outs):
        assert torch.equal(u, v)


@pytest.mark.parametrize("mode", ["ag", "ma"])
def test_training_with_scheduler_identical(mode):
    """A few reselection cycles with the optimizer and scheduler: same indices, values and losses."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
        snn.inject(model, density=0.1)
        return model

    model_a, model_b = build(), build()
    merged = snn.merge(model_b, train=True)
    assert merged and all(layer.train_merged for layer in merged.values())
    runs = []
    for model in (model_a, model_b):
        opt = SparseAdamW(model, lr=0.05) if mode == "ag" else SM3(model, lr=0.05)
        sched = SpielScheduler(model, opt, mode, total_steps=40, reselection_steps=4, accumulation_steps=2,
                               drop_fraction=0.3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(14):
            x = torch.randn(8, 24, generator=g)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.detach())
        runs.append((model, losses))
    (ma, la), (mb, lb) = runs
    assert torch.equal(torch.stack(la), torch.stack(lb))
    for (na, a), (nb, b) in zip(snn.sparse_delta_modules(ma).items(), snn.sparse_delta_modules(mb).items()):
        assert torch.equal(a.indices, b.indices), na
        assert torch.equal(a.values, b.values), na
        assert b.train_merged
        assert torch.equal(a.merged_weight(), b.merged_weight()), na
    # checkpoints of the merged-training model hold the original weights: they load into an unmerged model
    sd_b = mb.state_dict()
    for key, value in ma.state_dict().items():
        assert torch.equal(value, sd_b[key]), key
    fresh = build()
    fresh.load_state_dict(sd_b)
    x = torch.randn(3, 24)
    assert torch.equal(fresh(x), mb(x))
    # and loading into a merged-training model keeps it merged and right
    mb.load_state_dict(ma.state_dict())
    assert all(layer.train_merged for layer in snn.sparse_delta_modules(mb).values())
    assert torch.equal(mb(x), ma(x))


def test_merge_modes_and_errors():
    a, b = _pair(torch.float32)
    with pytest.raises(RuntimeError, match="already merged"):
        b.merge_()  # inference merge on a training merge
    b.merge_(train=True)  # idempotent
    b.unmerge_()
    b.merge_()
    with pytest.raises(RuntimeError, match="already merged"):
        b.merge_(train=True)
    b.unmerge_()
    w = torch.randn(29, 38)
    idx = torch.arange(0, 29 * 38, 5, dtype=torch.int32)
    with pytest.raises(TypeError, match="weight_merged"):
        ops.sparse_delta_linear(torch.randn(2, 38), ops.nf4_quantize(w), idx, torch.zeros(idx.numel()),
                                weight_merged=True)


def test_functional_weight_merged_matches_unmerged():
    a, _ = _pair(torch.bfloat16, bias=False)
    merged = a.merged_weight()
    x = torch.randn(4, 37, dtype=torch.bfloat16)
    va = a.values.detach().clone().requires_grad_()
    vb = a.values.detach().clone().requires_grad_()
    ya = ops.sparse_delta_linear(x, a.weight, a.indices, va)
    yb = ops.sparse_delta_linear(x, merged, a.indices, vb, weight_merged=True)
    assert torch.equal(ya, yb)
    ya.float().sum().backward()
    yb.float().sum().backward()
    assert torch.equal(va.grad, vb.grad)


def test_merge_train_skips_tied_weights():
    """A weight shared with another module (tied) must not be merged in place for training."""
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False), nn.Linear(16, 16))
    model[1].weight = model[0].weight  # tied
    snn.inject(model, density=0.2)
    with pytest.warns(UserWarning, match="tied"):
        merged = snn.merge(model, train=True)
    assert set(merged) == {"2"}
    assert not model[0].merged and not model[1].merged and model[2].train_merged


def test_load_deltas_and_restore_while_train_merged(tmp_path):
    import spiel

    def build(density):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        snn.inject(model, density=density)
        return model

    a = build(0.2)
    with torch.no_grad():
        for layer in snn.sparse_delta_modules(a).values():
            layer.values.normal_()
    path = tmp_path / "deltas.safetensors"
    spiel.save_deltas(a, path)
    b = build(0.1)
    originals = {n: m.weight.detach().clone() for n, m in snn.sparse_delta_modules(b).items()}
    snn.merge(b, train=True)
    spiel.load_deltas(b, path)  # a different k: the layers resize and stay merged for training
    x = torch.randn(4, 16)
    assert torch.equal(a(x), b(x))
    assert all(layer.train_merged for layer in snn.sparse_delta_modules(b).values())
    snn.restore(b)
    for name, w in originals.items():
        assert torch.equal(b.get_submodule(name).weight, w), name


def test_merged_entries_written_only_when_values_change(monkeypatch):
    """The forward rewrites the k entries only after values (or indices, or the weight) changed: once per
    optimizer step, not again in a checkpoint's recompute; every kind of change is still seen."""
    a, b = _pair(torch.float32)
    writes = []
    original = SparseDeltaLinear._write_merged_entries
    monkeypatch.setattr(SparseDeltaLinear, "_write_merged_entries",
                        lambda self: (writes.append(1), original(self))[1])
    x = torch.randn(4, 37, requires_grad=True)

    def check():
        ya = checkpoint(a, x, use_reentrant=False)
        yb = checkpoint(b, x, use_reentrant=False)
        assert torch.equal(ya, yb)
        (ya.sum() + yb.sum()).backward()
        assert torch.equal(a.values.grad, b.values.grad)
        a.values.grad = b.values.grad = None

    check()
    assert len(writes) == 0  # merge_ wrote them; nothing changed since
    for change in ("inplace", "set_indices", "weight_copy"):
        before = len(writes)
        with torch.no_grad():
            if change == "inplace":  # an optimizer step
                for layer in (a, b):
                    layer.values.mul_(0.5).add_(0.25)
            elif change == "set_indices":
                idx = snn.random_indices(37 * 29, a.num_deltas + 3, generator=torch.Generator().manual_seed(5))
                for layer in (a, b):
                    layer.set_indices(idx)
            else:  # someone writes the Parameter itself: the k entries are refreshed on top of it
                w = a.weight.detach().clone()
                a.weight.copy_(w)
                b.weight.copy_(b.weight.detach().clone())
        check()  # forward + recompute + backward
        assert len(writes) - before == 1, change  # set_indices: its merge_ writes, the forwards find them current


def test_merged_op_does_not_save_values():
    """Trained merged, backward needs no values (the weight holds W + delta): the op saves input and indices
    only, i.e. one saved-tensor hook pair less per layer under gradient checkpointing; gradients unchanged."""
    a, b = _pair(torch.float32)
    x = torch.randn(3, 37, requires_grad=True)
    packed = {}
    for name, layer in (("unmerged", a), ("merged", b)):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (seen.append(t), t)[1], lambda t: t):
            y = layer(x)
        packed[name] = seen
        y.sum().backward()
    assert any(t is a.values or t.data_ptr() == a.values.data_ptr() for t in packed["unmerged"])
    assert not any(t.data_ptr() == b.values.data_ptr() for t in packed["merged"])
    assert len(packed["merged"]) == len(packed["unmerged"]) - 1
    assert torch.equal(a.values.grad, b.values.grad)


@pytest.mark.parametrize("weight_dtype,values_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                                       (torch.float32, torch.float32)])
def test_refresh_merged_entries_batched(monkeypatch, weight_dtype, values_dtype):
    """refresh_merged_entries writes what each layer's forward would (bit for bit; chunked; mixed k), skips
    current and unmerged layers, and leaves the refreshed layers current: their forwards write nothing. The
    scheduler's step calls it, so a training loop's forwards never rewrite merged entries."""
    monkeypatch.setattr(snn.linear, "MERGED_WRITE_BATCH_ELEMENTS", 50)  # several chunks, one layer alone in one
    torch.manual_seed(3)
    shapes = [(37, 29, 40), (16, 8, 9), (20, 30, 70), (5, 6, 3)]
    layers = [SparseDeltaLinear(i, o, num_deltas=k, dtype=weight_dtype, values_dtype=values_dtype)
              for i, o, k in shapes]
    twins = copy.deepcopy(layers)
    for layer in layers + twins:
        layer.merge_(train=True)
    plain = SparseDeltaLinear(8, 8, num_deltas=5)
    with torch.no_grad():
        for a, b in zip(layers, twins):
            step = torch.randn(a.values.shape).to(values_dtype)
            a.values.add_(step)
            b.values.add_(step)
    current = layers[3]
    current._refresh_merged_entries()  # already written: skipped
    writes = []
    original = SparseDeltaLinear._write_merged_entries
    monkeypatch.setattr(SparseDeltaLinear, "_write_merged_entries",
                        lambda self: (writes.append(self), original(self))[1])
    snn.refresh_merged_entries(layers + [plain])
    assert writes == []  # batched, not through the per-layer write
    for b in twins:
        b._refresh_merged_entries()  # the per-layer path
    for a, b in zip(layers, twins):
        assert torch.equal(a.weight, b.weight)
        assert a._merged_key() == a._merged_written
    writes.clear()
    for a in layers:
        a(torch.randn(2, a.in_features).to(weight_dtype))
    assert writes == []
    # in a training loop the scheduler's step refreshes every merged layer: no forward rewrites entries
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
    snn.inject(model, density=0.1)
    snn.merge(model, train=True)
    opt = SparseAdamW(model, lr=0.05)
    sched = SpielScheduler(model, opt, "ag", total_steps=40, reselection_steps=4, accumulation_steps=2)
    for _ in range(6):
        model(torch.randn(8, 24)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    writes.clear()
    model(torch.randn(8, 24))
    assert writes == []
