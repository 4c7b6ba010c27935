"""spiel.optim: SparseAdamW and SM3 against dense references restricted to the active entries."""
import io

import pytest
import torch
from torch import nn

from spiel.nn.linear import SparseDeltaLinear
from spiel.optim import SM3, SparseAdamW, sparse_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(out_f=12, in_f=10, k=30, seed=0, values_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return SparseDeltaLinear(in_f, out_f, num_deltas=k, generator=g, values_dtype=values_dtype)


def _dense_grad(layer, grad):
    d = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    d[layer.indices.long()] = grad.double()
    return d.view(layer.out_features, layer.in_features)


def _train_like_dense_adamw(layer, opt, hyper, steps):
    """``steps`` steps of ``opt`` on random gradients of ``layer.values`` next to torch.optim.AdamW on a float64
    dense [out, in] parameter fed the same gradients at the active entries; the active entries must agree
    after every step. Returns (dense, its AdamW) to continue from."""
    dense = nn.Parameter(torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64))
    ref = torch.optim.AdamW([dense], **hyper)
    for _ in range(steps):
        g = torch.randn(layer.values.numel())
        layer.values.grad = g.clone()
        dense.grad = _dense_grad(layer, g)
        opt.step()
        ref.step()
        torch.testing.assert_close(layer.values.detach().double(), dense.detach().view(-1)[layer.indices.long()],
                                   rtol=1e-5, atol=1e-6)
    return dense, ref


def _change_indices(layer, n, seed):
    """Drop the n last slots, add n random new positions (values 0); returns (order, regrown, stayed_old_pos)."""
    g = torch.Generator().manual_seed(seed)
    numel = layer.out_features * layer.in_features
    old = layer.indices.long()
    k = old.numel()
    free = torch.ones(numel, dtype=torch.bool)
    free[old] = False
    pool = free.nonzero().view(-1)
    new_pos = pool[torch.randperm(pool.numel(), generator=g)[:n]]
    keep = torch.arange(k - n)
    merged = torch.cat([old[keep], new_pos])
    new_idx, perm = torch.sort(merged)
    order = torch.cat([keep, torch.full((n,), -1)])[perm]
    regrown = order < 0
    vals = layer.values.detach()[order.clamp(min=0)].masked_fill(regrown, 0)
    layer.set_indices(new_idx, vals)
    return order, regrown


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparse_adamw_matches_dense_adamw_across_reindex(weight_decay):
    torch.manual_seed(0)
    layer = _layer()
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt = SparseAdamW(layer, **hyper)
    dense, ref = _train_like_dense_adamw(layer, opt, hyper, 6)
    old_idx = layer.indices.long().clone()
    order, regrown = _change_indices(layer, 8, seed=1)
    opt.reindex(layer, order, regrown)
    st = opt.state[layer.values]
    assert st["step"].dtype == torch.int16
    assert st["step"][regrown].tolist() == [0] * 8
    assert st["step"][~regrown].tolist() == [6] * 22
    assert torch.equal(st["exp_avg"][regrown], torch.zeros(8))
    # regrown entries must behave like a fresh AdamW started at 0 on those entries
    fresh = nn.Parameter(torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64))
    fresh_opt = torch.optim.AdamW([fresh], **hyper)
    new_idx = layer.indices.long()
    for _ in range(5):
        g = torch.randn(layer.values.numel())
        layer.values.grad = g.clone()
        dense.grad = _dense_grad(layer, g)
        fresh.grad = _dense_grad(layer, g)
        opt.step()
        ref.step()
        fresh_opt.step()
    vals = layer.values.detach().double()
    stayed = ~regrown
    assert torch.isin(new_idx[stayed], old_idx).all()
    torch.testing.assert_close(vals[stayed], dense.detach().view(-1)[new_idx[stayed]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vals[regrown], fresh.detach().view(-1)[new_idx[regrown]], rtol=1e-5, atol=1e-6)


def test_sparse_adamw_bf16_state_and_bf16_values():
    torch.manual_seed(0)
    a, b = _layer(seed=3), _layer(seed=3, values_dtype=torch.bfloat16)
    opt32 = SparseAdamW(a, lr=0.01)
    opt16 = SparseAdamW(b, lr=0.01, state_dtype=torch.bfloat16)
    for _ in range(5):
        g = torch.randn(a.values.numel())
        a.values.grad = g.clone()
        b.values.grad = g.to(torch.bfloat16)
        opt32.step()
        opt16.step()
    st = opt16.state[b.values]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    assert st["step"].dtype == torch.int16  # compact per-slot step counts
    assert b.values.dtype == torch.bfloat16
    torch.testing.assert_close(b.values.float(), a.values.detach(), rtol=3e-2, atol=3e-3)
    # state_dict round trip keeps the bf16 moments bf16 (torch's default loader would cast them to the values'
    # dtype) and fp32 moments of bf16 values fp32
    c = _layer(seed=3, values_dtype=torch.bfloat16)
    opt_c = SparseAdamW(c, lr=0.01, state_dtype=torch.float32)
    c.values.grad = torch.randn(c.values.numel()).to(torch.bfloat16)
    opt_c.step()
    buf = io.BytesIO()
    torch.save(opt_c.state_dict(), buf)
    buf.seek(0)
    d = _layer(seed=3, values_dtype=torch.bfloat16)
    opt_d = SparseAdamW(d, lr=0.01)
    opt_d.load_state_dict(torch.load(buf))
    assert opt_d.state[d.values]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt_d.state[d.values]["exp_avg"], opt_c.state[c.values]["exp_avg"])


class _DenseSM3:
    """Dense SM3 (row/col covers) over a fixed mask of active entries: the reference."""

    def __init__(self, shape, lr, momentum, eps):
        self.row = torch.zeros(shape[0], dtype=torch.float64)
        self.col = torch.zeros(shape[1], dtype=torch.float64)
        self.mom = torch.zeros(shape, dtype=torch.float64)
        self.w = torch.zeros(shape, dtype=torch.float64)
        self.lr, self.momentum, self.eps = lr, momentum, eps

    def step(self, mask, grad):
        nu = torch.minimum(self.row[:, None], self.col[None, :]) + grad ** 2
        nu_m = torch.where(mask, nu, torch.full_like(nu, -1.0))
        self.row = torch.maximum(self.row, nu_m.max(1).values)
        self.col = torch.maximum(self.col, nu_m.max(0).values)
        u = torch.where(mask, grad / (nu.sqrt() + self.eps), torch.zeros_like(nu))
        if self.momentum > 0:
            self.mom = torch.where(mask, self.momentum * self.mom + (1 - self.momentum) * u, self.mom)
            u = self.mom
        self.w -= self.lr * torch.where(mask, u, torch.zeros_like(u))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sm3_matches_dense_reference_across_reindex(momentum):
    torch.manual_seed(0)
    layers = [_layer(12, 10, 30, seed=0), _layer(7, 9, 20, seed=1)]
    opt = SM3(layers, lr=0.1, momentum=momentum, eps=1e-8)
    refs = [_DenseSM3((l.out_features, l.in_features), 0.1, momentum, 1e-8) for l in layers]

    def run(n):
        for _ in range(n):
            for layer, ref in zip(layers, refs):
                g = torch.randn(layer.values.numel())
                layer.values.grad = g.clone()
                mask = torch.zeros(layer.out_features * layer.in_features, dtype=torch.bool)
                mask[layer.indices.long()] = True
                ref.step(mask.view_as(ref.w), _dense_grad(layer, g))
            opt.step()
            for layer, ref in zip(layers, refs):
                row, col = opt.accumulators(layer)
                torch.testing.assert_close(row.double(), ref.row, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(col.double(), ref.col, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(layer.values.detach().double(), ref.w.view(-1)[layer.indices.long()],
                                           rtol=1e-5, atol=1e-6)

    run(4)
    for i, (layer, ref) in enumerate(zip(layers, refs)):
        order, regrown = _change_indices(layer, 5, seed=10 + i)
        opt.reindex(layer, order, regrown)
        # the reference: a regrown entry starts at value 0 with zero momentum; accumulators are kept
        new = layer.indices.long()[regrown]
        ref.w.view(-1)[new] = 0
        ref.mom.view(-1)[new] = 0
        if momentum > 0:
            assert torch.equal(opt.state[layer.values]["momentum_buffer"][regrown], torch.zeros(5))
    run(4)
    # memory: O(out + in + k) per layer
    for layer in layers:
        st = opt.state[layer.values]
        total = sum(t.numel() for t in st.values() if isinstance(t, torch.Tensor))
        assert total == layer.out_features + layer.in_features + (layer.values.numel() if momentum else 0)


def test_other_params_use_plain_adamw_and_lr_scheduler():
    torch.manual_seed(0)
    layer = _layer()
    head = nn.Linear(6, 3)
    head_ref = nn.Linear(6, 3)
    head_ref.load_state_dict(head.state_dict())
    for Opt, kw in ((SparseAdamW, dict(weight_decay=0.01)), (SM3, dict(other_weight_decay=0.01))):
        opt = Opt(layer, lr=0.01, other_params=head.parameters(), **kw)
        assert [g["sparse"] for g in opt.param_groups] == [True, False]
        ref = torch.optim.AdamW(head_ref.parameters(), lr=0.01, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
        for _ in range(4):
            x = torch.randn(5, 6)
            for h in (head, head_ref):
                h.zero_grad()
                h(x).pow(2).sum().backward()
            layer.values.grad = torch.randn(layer.values.numel())
            opt.step()
            ref.step()
            sched.step()
            ref_sched.step()
        torch.testing.assert_close(head.weight, head_ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.bias, head_ref.bias, rtol=1e-5, atol=1e-6)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 5)


def test_reindex_permutes_state_and_seeds():
    layer = _layer(k=6)
    opt = SparseAdamW(layer)
    st = opt.state[layer.values]
    st["exp_avg"].copy_(torch.arange(6.0))
    st["step"].fill_(3)
    order = torch.tensor([5, -1, 0, 2, -1, 1])
    regrown = order < 0
    opt.reindex(layer, order, regrown, seed={"exp_avg": torch.tensor([7.0, 8.0])})
    assert st is opt.state[layer.values]
    assert opt.state[layer.values]["exp_avg"].tolist() == [5.0, 7.0, 0.0, 2.0, 8.0, 1.0]
    assert opt.state[layer.values]["step"].tolist() == [3, 0, 3, 3, 0, 3]
    assert opt.state[layer.values]["exp_avg_sq"].tolist() == [0.0] * 6


def test_many_layers_some_without_grad_and_discovery():
    torch.manual_seed(0)
    model = nn.Sequential(*[_layer(8, 8, 5, seed=i) for i in range(10)], nn.Linear(8, 8))
    assert [n for n, _ in sparse_layers(model)] == [str(i) for i in range(10)]
    opt = SparseAdamW(model, lr=0.1)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 10
    before = [m.values.detach().clone() for m in model[:10]]
    for i, m in enumerate(model[:10]):
        m.values.grad = torch.randn(5) if i % 2 == 0 else None
    opt.step()
    for i, m in enumerate(model[:10]):
        changed = not torch.equal(m.values.detach(), before[i])
        assert changed == (i % 2 == 0)
        assert opt.state[m.values]["step"].tolist() == [int(i % 2 == 0)] * 5
    with pytest.raises(ValueError):
        SparseAdamW(nn.Linear(3, 3))
    with pytest.raises(ValueError):
        SparseAdamW(model, lr=-1.0)


def test_optimizer_state_dict_resume_is_bit_identical():
    def make():
        torch.manual_seed(0)
        return [_layer(12, 10, 30, seed=0), _layer(6, 5, 9, seed=1)]

    def grads(step):
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(30, generator=g), torch.randn(9, generator=g)]

    for Opt in (SparseAdamW, lambda ls: SM3(ls, lr=0.05, momentum=0.5)):
        a = make()
        opt_a = Opt(a)
        for s in range(6):
            for l, g in zip(a, grads(s)):
                l.values.grad = g
            opt_a.step()
        b = make()
        opt_b = Opt(b)
        for s in range(3):
            for l, g in zip(b, grads(s)):
                l.values.grad = g
            opt_b.step()
        buf = io.BytesIO()
        torch.save({"opt": opt_b.state_dict(), "vals": [l.values.detach().clone() for l in b]}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        c = make()
        for l, v in zip(c, saved["vals"]):
            l.values.data.copy_(v)
        opt_c = Opt(c)
        opt_c.load_state_dict(saved["opt"])
        for s in range(3, 6):
            for l, g in zip(c, grads(s)):
                l.values.grad = g
            opt_c.step()
        for la, lc in zip(a, c):
            assert torch.equal(la.values, lc.values)


@pytest.mark.parametrize("Opt", [SparseAdamW, SM3])
def test_step_leaves_gradients_untouched_single_layer(Opt):
    layer = _layer()
    opt = Opt(layer, lr=0.1, weight_decay=0.1)
    g = torch.randn(layer.values.numel())
    layer.values.grad = g.clone()
    opt.step()
    assert torch.equal(layer.values.grad, g)
    assert not torch.equal(layer.values.detach(), torch.zeros_like(g))


def _random_reorder(L, k, gen):
    """order [L, k] (any old slot, -1 where regrown) and regrown [L, k], as an index update hands them over."""
    regrown = torch.rand(L, k, generator=gen) < 0.3
    order = torch.randint(0, k, (L, k), generator=gen).masked_fill(regrown, -1)
    return order, regrown


def _reindex_fixture(Opt, seed=0):
    """Layers of three shapes sharing k, values fp32/bf16/fp16, warmed state; some state made irregular:
    bf16 moments and int32 steps on one layer, no state on another, a state tensor of another length."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 8), (12, 5), (10, 10)]
    vdt = [torch.float32, torch.bfloat16, torch.float16]
    layers = nn.ModuleList([SparseDeltaLinear(shapes[i % 3][1], shapes[i % 3][0], num_deltas=20, generator=g,
                                              values_dtype=vdt[i % 3]) for i in range(7)])
    opt = SparseAdamW(layers, lr=0.1) if Opt is SparseAdamW else SM3(layers, lr=0.1, momentum=0.9)
    for step in range(2):
        for layer in layers:
            layer.values.grad = torch.randn(20, generator=g).to(layer.values.dtype)
        opt.step()
    states = [opt.state[layer.values] for layer in layers]
    if Opt is SparseAdamW:
        states[1]["exp_avg"] = states[1]["exp_avg"].bfloat16()
        states[1]["step"] = states[1]["step"].to(torch.int32)
        states[4]["exp_avg_sq"] = torch.cat([states[4]["exp_avg_sq"], torch.rand(3, generator=g)])
    else:
        states[4]["momentum_buffer"] = torch.cat([states[4]["momentum_buffer"], torch.rand(3, generator=g)])
    del opt.state[layers[2].values]
    return layers, opt


@pytest.mark.parametrize("Opt", [SparseAdamW, SM3])
def test_reindex_many_matches_per_layer_reindex(Opt):
    order, regrown = _random_reorder(7, 20, torch.Generator().manual_seed(5))
    layers_a, opt_a = _reindex_fixture(Opt)
    for layer, o, r in zip(layers_a, order, regrown):
        opt_a.reindex(layer, o, r)
    layers_b, opt_b = _reindex_fixture(Opt)
    before = {id(layer.values): dict(opt_b.state.get(layer.values, {})) for layer in layers_b}
    opt_b.reindex_many(list(layers_b), order, regrown)
    for la, lb in zip(layers_a, layers_b):
        sa, sb = opt_a.state.get(la.values, {}), opt_b.state.get(lb.values, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
            if key in Opt._slot_state and before[id(lb.values)][key].numel() == 20:
                assert sb[key] is before[id(lb.values)][key]  # written in place: no new tensor per layer
    odd_key = "exp_avg_sq" if Opt is SparseAdamW else "momentum_buffer"
    assert opt_b.state[layers_b[4].values][odd_key].numel() == 20  # the other length: reindexed as reindex does
    assert layers_b[2].values not in opt_b.state
    with pytest.raises(ValueError):
        opt_b.reindex_many(list(layers_b), order[:3], regrown[:3])

    class Logged(Opt):
        calls = 0

        def reindex(self, layer, order, regrown, seed=None):
            Logged.calls += 1
            super().reindex(layer, order, regrown, seed)

    layers_c, _ = _reindex_fixture(Opt)
    opt_c = Logged(layers_c, lr=0.1)
    opt_c.reindex_many(list(layers_c), order, regrown)
    assert Logged.calls == 7  # a subclass's own reindex is never bypassed


def test_reindex_many_with_aliased_state_matches_per_layer():
    """Two layers sharing one state tensor (written in place, one would overwrite the other): new tensors."""
    runs = []
    for batched in (False, True):
        layers, opt = _reindex_fixture(SparseAdamW)
        shared = opt.state[layers[0].values]["exp_avg"]
        opt.state[layers[3].values]["exp_avg"] = shared
        order, regrown = _random_reorder(7, 20, torch.Generator().manual_seed(6))
        if batched:
            opt.reindex_many(list(layers), order, regrown)
        else:
            for layer, o, r in zip(layers, order, regrown):
                opt.reindex(layer, o, r)
        runs.append([opt.state[layer.values]["exp_avg"].clone() for layer in (layers[0], layers[3])] + [shared])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("Opt,kwargs", [(SparseAdamW, {}), (SparseAdamW, {"fused": True}),
                                        (SparseAdamW, {"state_dtype": torch.bfloat16}),
                                        (SM3, {}), (SM3, {"momentum": 0.9})])
def test_step_in_backward_matches_step(Opt, kwargs):
    """step_in_backward: the same values as backward() + step(), every sparse gradient freed inside backward,
    step() still updates other_params; a model with a scheduler-free index change keeps working."""
    def build():
        torch.manual_seed(0)
        layers = nn.ModuleList([_layer(12, 10, 30, seed=0), _layer(10, 12, 25, seed=1), _layer(7, 10, 9, seed=2)])
        head = nn.Linear(7, 3)
        return layers, head

    def loss_of(layers, head, x):
        h = x
        for layer in layers:
            h = torch.tanh(layer(h))
        return head(h).square().mean()

    runs = []
    for in_backward in (False, True, "flush"):
        layers, head = build()
        opt = Opt(layers, lr=0.05, other_params=head.parameters(), step_in_backward=bool(in_backward), **kwargs)
        if in_backward == "flush":  # queued layers updated as soon as they hold 40 deltas (else: at the end)
            opt.BACKWARD_FLUSH_NUMEL = 40
        seen = []
        for step in range(4):
            x = torch.randn(5, 10, generator=torch.Generator().manual_seed(100 + step))
            loss_of(layers, head, x).backward()
            seen.append([layer.values.grad is None for layer in layers])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 1:
                _change_indices(layers[0], 4, seed=7)
                order = torch.arange(layers[0].num_deltas)
                opt.reindex(layers[0], order, torch.zeros_like(order, dtype=torch.bool))
        runs.append((layers, head, seen))
    (ref_layers, ref_head, ref_seen) = runs[0]
    assert all(not any(s) for s in ref_seen)  # without the option the grads are there after backward
    for layers, head, seen in runs[1:]:
        assert all(all(s) for s in seen)  # with it, freed inside backward
        for a, b in zip(ref_layers, layers):
            assert not torch.equal(b.values.detach(), torch.zeros_like(b.values))
            torch.testing.assert_close(b.values.detach(), a.values.detach(), rtol=0, atol=0)
        for a, b in zip(ref_head.parameters(), head.parameters()):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)


def test_step_in_backward_flushes_at_the_threshold():
    """Layers are updated inside backward in groups: once the queued ones hold BACKWARD_FLUSH_NUMEL deltas, the
    rest when the backward ends; the grads of an updated group are freed before later layers' backward."""
    layers = nn.ModuleList([_layer(10, 10, 30, seed=i) for i in range(4)])
    opt = SparseAdamW(layers, lr=0.1, step_in_backward=True)
    opt.BACKWARD_FLUSH_NUMEL = 60  # two layers
    alive_at_first_layer = []
    layers[0].values.register_hook(lambda g: alive_at_first_layer.append(
        [layer.values.grad is not None for layer in layers]))
    h = torch.randn(3, 10)
    for layer in layers:
        h = torch.tanh(layer(h))
    h.sum().backward()
    # backward reaches layer 0 last: layers 3 and 2 were updated as a pair (grads freed), layer 1 is queued
    assert alive_at_first_layer == [[False, True, False, False]]
    assert all(layer.values.grad is None for layer in layers)
    assert all(not torch.equal(layer.values.detach(), torch.zeros(30)) for layer in layers)


def test_step_in_backward_remove_hooks_and_bad_argument():
    layer = _layer()
    with pytest.raises(TypeError, match="step_in_backward"):
        SparseAdamW(layer, step_in_backward=1)
    opt = SparseAdamW(layer, lr=0.1, step_in_backward=True)
    layer(torch.randn(3, 10)).sum().backward()
    assert layer.values.grad is None and not torch.equal(layer.values.detach(), torch.zeros(30))
    opt.remove_backward_hooks()
    before = layer.values.detach().clone()
    layer(torch.randn(3, 10)).sum().backward()
    assert layer.values.grad is not None and torch.equal(layer.values.detach(), before)
    opt.step()
    assert not torch.equal(layer.values.detach(), before)


def test_sparse_adamw_per_tensor_steps_matches_torch_adamw_and_reindex_keeps_the_count():
    """per_slot_steps=False: one host count per layer, exactly torch.optim.AdamW's math on the active entries
    (float64 dense reference); a reindex zeroes the regrown slots' moments and leaves the count; the state
    dict round-trips, and converts to and from per-slot steps."""
    torch.manual_seed(0)
    layer = _layer()
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = SparseAdamW(layer, per_slot_steps=False, **hyper)
    _train_like_dense_adamw(layer, opt, hyper, 5)
    st = opt.state[layer.values]
    assert st["step"].dim() == 0 and st["step"].device.type == "cpu" and float(st["step"]) == 5.0
    m_before = st["exp_avg"].clone()
    order, regrown = _change_indices(layer, 4, seed=3)
    opt.reindex(layer, order, regrown)
    assert float(opt.state[layer.values]["step"]) == 5.0
    assert torch.equal(opt.state[layer.values]["exp_avg"][regrown], torch.zeros(4))
    assert torch.equal(opt.state[layer.values]["exp_avg"][~regrown], m_before[order[~regrown]])
    saved = opt.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)
    fresh = SparseAdamW(layer, per_slot_steps=False, **hyper)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert float(fresh.state[layer.values]["step"]) == 5.0
    slot = SparseAdamW(layer, **hyper)  # per-slot steps from a per-tensor checkpoint: every slot at 5
    slot.load_state_dict(saved)
    assert torch.equal(slot.state[layer.values]["step"], torch.full((30,), 5, dtype=torch.int16))
    slot.state[layer.values]["step"][3] = 9
    back = SparseAdamW(layer, per_slot_steps=False, **hyper)  # and back: the largest count
    back.load_state_dict(slot.state_dict())
    assert float(back.state[layer.values]["step"]) == 9.0
    with pytest.raises(TypeError, match="per_slot_steps must be a bool"):
        SparseAdamW(layer, per_slot_steps="no")
