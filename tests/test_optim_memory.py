"""spiel.optim memory layout: grouped (chunked) updates give the unchunked math, compact per-slot step counts,
loading checkpoints with fp32 per-slot steps, and the state / temporary bytes per delta."""
import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spiel.nn.linear import SparseDeltaLinear
from spiel.optim import SM3, SparseAdamW, adamw_foreach
from spiel.optim.adamw import INT16_STEP_LIMIT


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = [(12, 10, 30), (7, 9, 20), (12, 10, 25), (5, 40, 100), (7, 9, 3), (12, 10, 1)]


def _layers(values_dtype=torch.float32, shapes=SHAPES):
    return [SparseDeltaLinear(i, o, num_deltas=k, generator=torch.Generator().manual_seed(s),
                              values_dtype=values_dtype) for s, (o, i, k) in enumerate(shapes)]


def _grads(layers, step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(l.values.numel(), generator=g).to(dtype) for l in layers]


def _change_indices(layer, n, seed):
    """Drop the n last slots, add n random new positions (value 0); returns (order, regrown)."""
    g = torch.Generator().manual_seed(seed)
    old = layer.indices.long()
    k = old.numel()
    free = torch.ones(layer.out_features * layer.in_features, dtype=torch.bool)
    free[old] = False
    pool = free.nonzero().view(-1)
    new_pos = pool[torch.randperm(pool.numel(), generator=g)[:n]]
    merged = torch.cat([old[:k - n], new_pos])
    new_idx, perm = torch.sort(merged)
    order = torch.cat([torch.arange(k - n), torch.full((n,), -1)])[perm]
    regrown = order < 0
    layer.set_indices(new_idx, layer.values.detach()[order.clamp(min=0)].masked_fill(regrown, 0))
    return order, regrown


# ------------------------------------------------------------------------------- references (previous math)
@torch.no_grad()
def _reference_adamw(params, grads, ms, vs, steps, *, lr, beta1, beta2, eps, weight_decay):
    """The previous, unchunked implementation: fp32 per-slot steps, every layer at once."""
    torch._foreach_add_(steps, 1.0)
    p32 = [p.float() for p in params]
    g32 = [g.float() for g in grads]
    m32 = [m.float() for m in ms]
    v32 = [v.float() for v in vs]
    if weight_decay:
        torch._foreach_mul_(p32, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(m32, g32, 1.0 - beta1)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, g32, g32, 1.0 - beta2)
    bc1 = torch._foreach_pow(beta1, steps)
    bc2 = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bc1, 1.0)
    torch._foreach_div_(bc1, lr)
    torch._foreach_reciprocal_(bc1)
    torch._foreach_sub_(bc2, 1.0)
    torch._foreach_neg_(bc2)
    torch._foreach_sqrt_(bc2)
    denom = torch._foreach_sqrt(v32)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, bc1)
    torch._foreach_addcdiv_(p32, m32, denom)
    for dst, src in ((params, p32), (ms, m32), (vs, v32)):
        for d, s in zip(dst, src):
            d.copy_(s)


class _ReferenceSM3:
    """Per-layer SM3 with the previous math (scatter_reduce amax on each layer's own accumulators)."""

    def __init__(self, layers, lr, momentum, eps, weight_decay):
        self.layers, self.lr, self.momentum, self.eps, self.wd = layers, lr, momentum, eps, weight_decay
        self.row = [torch.zeros(l.out_features) for l in layers]
        self.col = [torch.zeros(l.in_features) for l in layers]
        self.mom = [torch.zeros(l.values.numel()) for l in layers]

    @torch.no_grad()
    def step(self, grads):
        for i, (layer, grad) in enumerate(zip(self.layers, grads)):
            if grad is None:
                continue
            idx = layer.indices.long()
            r, c = idx // layer.in_features, idx % layer.in_features
            g = grad.float()
            nu = torch.minimum(self.row[i][r], self.col[i][c]).addcmul_(g, g)
            self.row[i].scatter_reduce_(0, r, nu, "amax", include_self=True)
            self.col[i].scatter_reduce_(0, c, nu, "amax", include_self=True)
            u = g / (nu.sqrt() + self.eps)
            if self.momentum > 0:
                self.mom[i].mul_(self.momentum).add_(u, alpha=1.0 - self.momentum)
                u = self.mom[i]
            if self.wd:
                layer.values.mul_(1.0 - self.lr * self.wd)
            layer.values.add_(u, alpha=-self.lr)

    def reindex(self, i, order, regrown):
        self.mom[i] = self.mom[i][order.clamp(min=0)].masked_fill(regrown, 0)


# ------------------------------------------------------------------------------- (a) grouped == unchunked math
@pytest.mark.parametrize("group_numel", [1, 7, 64, None])
@pytest.mark.parametrize("values_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16)])
def test_sparse_adamw_groups_match_unchunked_reference(group_numel, values_dtype, state_dtype):
    hyper = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    a, b = _layers(values_dtype), _layers(values_dtype)
    opt = SparseAdamW(a, state_dtype=state_dtype, group_numel=group_numel, **hyper)
    ms = [torch.zeros(l.values.numel(), dtype=state_dtype) for l in b]
    vs = [torch.zeros(l.values.numel(), dtype=state_dtype) for l in b]
    steps = [torch.zeros(l.values.numel()) for l in b]
    for s in range(5):
        for l, g in zip(a, _grads(a, s, values_dtype)):
            l.values.grad = g
        opt.step()
        _reference_adamw([l.values.data for l in b], _grads(b, s, values_dtype), ms, vs, steps,
                         lr=0.02, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    tol = dict(rtol=1e-6, atol=1e-9) if values_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for la, lb, m, v, st in zip(a, b, ms, vs, steps):
        torch.testing.assert_close(la.values.detach(), lb.values.detach(), **tol)
        state = opt.state[la.values]
        torch.testing.assert_close(state["exp_avg"].float(), m.float(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"].float(), v.float(), rtol=1e-6, atol=1e-9)
        assert state["step"].dtype == torch.int16 and torch.equal(state["step"].float(), st)


@pytest.mark.parametrize("group_numel", [1, 7, 64, None])
@pytest.mark.parametrize("momentum,weight_decay,values_dtype", [(0.0, 0.0, torch.float32), (0.9, 0.1, torch.float32),
                                                                (0.5, 0.0, torch.bfloat16)])
def test_sm3_groups_match_per_layer_reference_across_reindex(group_numel, momentum, weight_decay, values_dtype):
    a, b = _layers(values_dtype), _layers(values_dtype)
    opt = SM3(a, lr=0.05, momentum=momentum, weight_decay=weight_decay, group_numel=group_numel)
    ref = _ReferenceSM3(b, 0.05, momentum, 1e-8, weight_decay)
    tol = dict(rtol=1e-6, atol=1e-9) if values_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)

    def run(first, n):
        for s in range(first, first + n):
            grads = _grads(a, s, values_dtype)
            if s % 3 == 0:
                grads[1] = None  # a layer without a gradient now and then
            for l, g in zip(a, grads):
                l.values.grad = g
            opt.step()
            ref.step(grads)
            for i, (la, lb) in enumerate(zip(a, b)):
                row, col = opt.accumulators(la)
                assert torch.equal(row, ref.row[i]) and torch.equal(col, ref.col[i])
                torch.testing.assert_close(la.values.detach(), lb.values.detach(), **tol)

    run(0, 4)
    for i, (la, lb) in enumerate(zip(a, b)):
        n = min(3, la.values.numel() - 1)
        if n < 1:
            continue
        order, regrown = _change_indices(la, n, seed=10 + i)
        _change_indices(lb, n, seed=10 + i)
        opt.reindex(la, order, regrown)
        ref.reindex(i, order, regrown)
    run(4, 4)


def test_sparse_adamw_groups_maximize_and_zero_lr():
    a, b, c = _layers(), _layers(), _layers()
    opt_max = SparseAdamW(a, lr=0.01, maximize=True, group_numel=7)
    opt_min = SparseAdamW(b, lr=0.01)
    opt_zero = SparseAdamW(c, lr=0.0, weight_decay=0.5, group_numel=7)
    for s in range(3):
        for la, lb, lc, g in zip(a, b, c, _grads(a, s, torch.float32)):
            la.values.grad, lb.values.grad, lc.values.grad = g, -g, g
        for opt in (opt_max, opt_min, opt_zero):
            opt.step()
    for la, lb, lc, ref in zip(a, b, c, _layers()):
        assert torch.equal(la.values, lb.values)
        assert torch.equal(lc.values, ref.values)  # lr 0: values untouched, moments and steps advance
        assert opt_zero.state[lc.values]["step"].tolist() == [3] * lc.values.numel()


# ------------------------------------------------------------------------------- (b) per-slot steps
def test_per_slot_int16_steps_after_reindex_and_saturation():
    layer = _layers(shapes=[(12, 10, 30)])[0]
    hyper = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6)
    opt = SparseAdamW(layer, group_numel=8, **hyper)
    st = opt.state[layer.values]
    assert st["step"].dtype == torch.int16 and st["step"].shape == (30,)
    for s in range(3):
        layer.values.grad = torch.randn(30)
        opt.step()
    order, regrown = _change_indices(layer, 6, seed=1)
    opt.reindex(layer, order, regrown)
    assert opt.state[layer.values]["step"].dtype == torch.int16
    assert opt.state[layer.values]["step"].tolist() == [0 if r else 3 for r in regrown.tolist()]
    layer.values.grad = torch.randn(30)
    opt.step()
    steps = opt.state[layer.values]["step"]
    assert steps.tolist() == [1 if r else 4 for r in regrown.tolist()]
    # seeds are clamped into range; counts saturate at 32767 and never wrap
    opt.reindex(layer, torch.arange(30), torch.arange(30) < 2, seed={"step": torch.tensor([10 ** 6, 32766.0])})
    steps = opt.state[layer.values]["step"]
    assert steps[:2].tolist() == [INT16_STEP_LIMIT, 32766]
    # a saturated slot updates exactly as with its true (larger) count: the bias corrections are 1 in fp32
    st = opt.state[layer.values]
    before = [t.clone() for t in (layer.values.detach(), st["exp_avg"], st["exp_avg_sq"])]
    g = torch.randn(30)
    layer.values.grad = g.clone()
    opt.step()
    assert opt.state[layer.values]["step"][:2].tolist() == [INT16_STEP_LIMIT, INT16_STEP_LIMIT]
    p, m, v = before
    true_steps = torch.full((30,), 40000.0)
    _reference_adamw([p], [g], [m], [v], [true_steps], lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)
    assert torch.equal(layer.values.detach()[:2], p[:2])


def test_step_dtype_follows_betas():
    layer = _layers(shapes=[(12, 10, 30)])[0]
    assert SparseAdamW(layer, betas=(0.9, 0.999)).state[layer.values]["step"].dtype == torch.int16
    opt = SparseAdamW(layer, betas=(0.9, 0.9999))  # beta2**32767 ~ 0.04: saturating int16 would not be exact
    assert opt.state[layer.values]["step"].dtype == torch.int32
    opt = SparseAdamW(layer)
    layer.values.grad = torch.randn(30)
    opt.step()
    opt.param_groups[0]["betas"] = (0.9, 0.99999)
    opt.step()  # widened, counts kept
    assert opt.state[layer.values]["step"].dtype == torch.int32
    assert opt.state[layer.values]["step"].tolist() == [2] * 30


# ------------------------------------------------------------------------------- (c) fp32-step checkpoints
def test_load_state_dict_with_fp32_per_slot_steps():
    def make():
        return _layers(shapes=SHAPES[:3])

    a, b = make(), make()
    opt_a = SparseAdamW(a, lr=0.01, weight_decay=0.01)
    for s in range(3):
        for l, g in zip(a, _grads(a, s, torch.float32)):
            l.values.grad = g
        opt_a.step()
    sd = copy.deepcopy(opt_a.state_dict())
    for st in sd["state"].values():  # the format of earlier versions: fp32 per-slot step counts
        st["step"] = st["step"].float()
    buf = io.BytesIO()
    torch.save({"opt": sd, "vals": [l.values.detach().clone() for l in a]}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    for l, v in zip(b, saved["vals"]):
        l.values.data.copy_(v)
    opt_b = SparseAdamW(b, lr=0.01, weight_decay=0.01)
    opt_b.load_state_dict(saved["opt"])
    for la, lb in zip(a, b):
        st = opt_b.state[lb.values]
        assert st["step"].dtype == torch.int16
        assert torch.equal(st["step"], opt_a.state[la.values]["step"])
    for s in range(3, 6):
        for ls in (a, b):
            for l, g in zip(ls, _grads(ls, s, torch.float32)):
                l.values.grad = g
        opt_a.step()
        opt_b.step()
    for la, lb in zip(a, b):
        assert torch.equal(la.values, lb.values)


def test_sm3_state_dict_round_trip_and_assigned_accumulators():
    a = _layers(shapes=SHAPES[:3])
    opt = SM3(a, lr=0.05, momentum=0.5, group_numel=16)
    for s in range(2):
        for l, g in zip(a, _grads(a, s, torch.float32)):
            l.values.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    b = _layers(shapes=SHAPES[:3])
    for la, lb in zip(a, b):
        lb.values.data.copy_(la.values.detach())
    opt_b = SM3(b, lr=0.05, momentum=0.5, group_numel=16)
    opt_b.load_state_dict(torch.load(buf))
    for la, lb in zip(a, b):
        ra, ca = opt.accumulators(la)
        rb, cb = opt_b.accumulators(lb)
        assert torch.equal(ra, rb) and torch.equal(ca, cb)
        assert rb.untyped_storage().data_ptr() == opt_b.accumulators(b[0])[0].untyped_storage().data_ptr()
    # a row assigned into the state is taken over at the next use
    opt_b.state[b[1].values]["row"] = torch.full((b[1].out_features,), 3.0)
    assert opt_b.accumulators(b[1])[0].tolist() == [3.0] * b[1].out_features
    for s in range(2, 4):
        for ls in (a, b):
            for l, g in zip(ls, _grads(ls, s, torch.float32)):
                l.values.grad = g
        opt.step()
        opt_b.step()
    assert torch.equal(a[0].values, b[0].values) and torch.equal(a[2].values, b[2].values)


# ------------------------------------------------------------------------------- (d) bytes per delta
def _state_bytes(opt):
    return sum(t.nbytes for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))


def test_persistent_state_bytes_per_delta():
    layers = _layers()
    k = sum(l.values.numel() for l in layers)
    rows_cols = sum(l.out_features + l.in_features for l in layers)
    for state_dtype, limit in ((torch.float32, 8 + 2), (torch.bfloat16, 4 + 2)):
        opt = SparseAdamW(layers, state_dtype=state_dtype)
        assert _state_bytes(opt) / k <= limit
        assert _state_bytes(opt) == limit * k
    opt = SM3(layers)
    assert _state_bytes(opt) == 4 * rows_cols  # O(out + in) per layer, nothing per delta
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for st in opt.state.values() for t in st.values()}
    assert sum(storages.values()) == 4 * rows_cols  # one flat buffer, every layer's row/col a view into it
    assert _state_bytes(SM3(layers, momentum=0.9)) == 4 * rows_cols + 4 * k


class _LargestNew(TorchDispatchMode):
    """Bytes of the largest allocation (all tensors one op creates, not views of its inputs) during a step."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = set()
        for a in list(args) + list((kwargs or {}).values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor):
                    ins.add(t.untyped_storage().data_ptr())
        if func is not torch.ops.aten.clone.default:  # SM3's snapshot of the (O(out + in)) accumulators
            new = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes()
                   for o in (out if isinstance(out, (list, tuple)) else (out,))
                   if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins}
            self.largest = max(self.largest, sum(new.values()))
        return out


@pytest.mark.parametrize("make", [lambda ls, gn: SparseAdamW(ls, weight_decay=0.1, group_numel=gn),
                                  lambda ls, gn: SparseAdamW(ls, state_dtype=torch.bfloat16, group_numel=gn),
                                  lambda ls, gn: SM3(ls, weight_decay=0.1, group_numel=gn),
                                  lambda ls, gn: SM3(ls, momentum=0.9, group_numel=gn)],
                         ids=["adamw", "adamw-bf16-state", "sm3", "sm3-momentum"])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_step_temporaries_are_bounded_by_the_group(make, values_dtype):
    layers = _layers(values_dtype)
    k = sum(l.values.numel() for l in layers)
    group_numel = 16
    assert k > 8 * group_numel
    opt = make(layers, group_numel)
    for s in range(2):  # the first step builds SM3's plan
        for l, g in zip(layers, _grads(layers, s, values_dtype)):
            l.values.grad = g
        mode = _LargestNew()
        with mode:
            opt.step()
    assert 0 < mode.largest <= 4 * group_numel  # fp32 / int32 temporaries of one group, never of all k deltas


# ------------------------------------------------------------------------------- bad input
def test_bad_group_numel_and_inputs():
    layers = _layers(shapes=SHAPES[:2])
    for Opt in (SparseAdamW, SM3):
        with pytest.raises(ValueError):
            Opt(layers, group_numel=0)
        with pytest.raises(TypeError):
            Opt(layers, group_numel=2.5)
    with pytest.raises(ValueError):
        SM3(layers[:1]).accumulators(layers[1])
    p = torch.zeros(4)
    with pytest.raises(ValueError):
        adamw_foreach([p], [p.clone()], [p.clone()], [p.clone()], [torch.zeros(3)], lr=0.1, beta1=0.9, beta2=0.99,
                      eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError):
        adamw_foreach([p], [], [p.clone()], [p.clone()], [torch.zeros(4)], lr=0.1, beta1=0.9, beta2=0.99,
                      eps=1e-8, weight_decay=0.0)
    with pytest.raises(TypeError):
        adamw_foreach([p], [p.clone()], [p.clone()], [p.clone()], [torch.zeros(4, dtype=torch.bool)], lr=0.1,
                      beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
