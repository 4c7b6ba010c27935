"""The scheduler's batched index update against straightforward per-layer implementations: segmented top-|x|,
batched topk_outer, the AG/MA drop + regrow of several layers of different shapes, value dtypes and index dtypes
(with ties), the probe's tie-breaking, and the number of host syncs (constant in the number of layers)."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import spiel.ops.backends.sddmm_plan as plan_module
from spiel import ops
from spiel.nn.linear import SparseDeltaLinear, set_indices_many
from spiel.optim import SM3, SparseAdamW
from spiel.scheduler import SpielScheduler, batched_topk_outer, segmented_topk_abs, top_gradient_entries
from spiel.scheduler._select import true_positions
from spiel.scheduler import _replace as replace
from spiel.scheduler.spiel_scheduler import _generic_reindex

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def _ties(shape, gen, lo=-3, hi=4, dtype=torch.float32, device="cpu"):
    """Small integers: many exact ties, zeros and (for floats) negative zeros."""
    x = torch.randint(lo, hi, shape, generator=gen).to(dtype)
    x[x == 0] = -0.0 if dtype.is_floating_point else 0
    return x.to(device)


# ----------------------------------------------------------------------------------------------- small tools
@pytest.mark.parametrize("device", DEVICES)
def test_true_positions(device):
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 100):
        mask = (torch.rand(n, generator=gen) < 0.4).to(device)
        expected = mask.nonzero().view(-1)
        assert torch.equal(true_positions(mask, expected.numel()), expected)
    with pytest.raises(ValueError):
        true_positions(torch.zeros(2, 2, dtype=torch.bool), 0)


# ----------------------------------------------------------------------------------------------- segmented top-k
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_segmented_topk_abs_matches_topk_abs(device, dtype):
    gen = torch.Generator().manual_seed(1)
    for sizes in ([5, 5, 5], [1, 9, 4, 0, 12], [30], [8, 8]):
        scores = [_ties((s,), gen, dtype=dtype, device=device) for s in sizes]
        for trial in range(4):
            counts = [int(torch.randint(0, s + 1, (1,), generator=gen)) for s in sizes]
            if trial == 0:
                counts = list(sizes)
            got = segmented_topk_abs(scores, counts)
            got_sorted = segmented_topk_abs(scores, counts, ascending=True)
            for s, c, g, a in zip(scores, counts, got, got_sorted):
                want = ops.topk_abs(s, c)
                assert torch.equal(g, want), (sizes, counts, s, g, want)
                assert torch.equal(a, torch.sort(want).values)


def test_segmented_topk_abs_rejects_bad_input():
    with pytest.raises(ValueError):
        segmented_topk_abs([torch.ones(3)], [4])
    with pytest.raises(ValueError):
        segmented_topk_abs([torch.ones(3)], [1, 2])
    with pytest.raises(TypeError):
        segmented_topk_abs([torch.ones(3, dtype=torch.int64)], [1])
    with pytest.raises(TypeError):
        segmented_topk_abs([torch.ones(2, 2)], [1])
    assert segmented_topk_abs([], []) == []


# ----------------------------------------------------------------------------------------------- batched topk_outer
def _random_exclude(m, n, count, gen, device):
    return torch.randperm(m * n, generator=gen)[:count].sort().values.to(device)


def _assert_outer_matches_reference(rows, cols, counts, excludes):
    """batched_topk_outer (ordered, and as a set) equals spiel.ops.topk_outer layer by layer."""
    got = batched_topk_outer(rows, cols, counts, excludes)
    as_set = batched_topk_outer(rows, cols, counts, excludes, ordered=False)
    for row, col, k, e, g, u in zip(rows, cols, counts, excludes, got, as_set):
        want = ops.topk_outer(row, col, k, exclude=e)
        assert torch.equal(g, want), (k, row, col, e, g, want)
        assert torch.equal(torch.sort(u).values, torch.sort(want).values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n", [(6, 8), (17, 5), (32, 64), (1, 9)])
def test_batched_topk_outer_matches_reference(device, m, n):
    gen = torch.Generator().manual_seed(m * 100 + n)
    for trial in range(6):
        L = 1 + trial % 4
        rows, cols, counts, excludes = [], [], [], []
        for i in range(L):
            kind = (trial + i) % 4
            if kind == 0:    # small integers: ties everywhere, zeros
                row, col = _ties((m,), gen, 0, 4, device=device), _ties((n,), gen, 0, 4, device=device)
            elif kind == 1:  # continuous
                row, col = torch.rand(m, generator=gen).to(device), torch.rand(n, generator=gen).to(device)
            elif kind == 2:  # mostly zeros: few positive products (fallback when fewer than k)
                row = (torch.rand(m, generator=gen) < 0.3).float().to(device)
                col = (torch.rand(n, generator=gen) < 0.3).float().to(device) * 2
            else:            # constant: every product ties
                row, col = torch.full((m,), 0.5, device=device), torch.full((n,), 3.0, device=device)
            n_excl = int(torch.randint(0, m * n // 2, (1,), generator=gen))
            exclude = _random_exclude(m, n, n_excl, gen, device)
            if i % 2:
                exclude = exclude.to(torch.int32)
            k = int(torch.randint(0, m * n - n_excl + 1, (1,), generator=gen))
            if trial % 2:
                k = min(k, max(1, (m * n) // 10))
            rows.append(row), cols.append(col), counts.append(k), excludes.append(exclude)
        _assert_outer_matches_reference(rows, cols, counts, excludes)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_topk_outer_fast_path_on_a_large_sparse_case(device):
    """Few regrown positions out of many, distinct and tied scores: the multisection path (not the fallback)."""
    gen = torch.Generator().manual_seed(5)
    m, n, L = 64, 48, 5
    rows = [torch.rand(m, generator=gen).to(device) for _ in range(L)]
    cols = [torch.rand(n, generator=gen).to(device) for _ in range(L)]
    rows[1] = torch.randint(0, 5, (m,), generator=gen).float().to(device)   # ties
    cols[1] = torch.randint(0, 5, (n,), generator=gen).float().to(device)
    excludes = [_random_exclude(m, n, 300, gen, device) for _ in range(L)]
    # the active set sits where the products are largest (as after some MA updates)
    top = ops.topk_outer(rows[2], cols[2], 300)
    excludes[2] = torch.sort(top).values
    counts = [100, 150, 80, 1, 200]
    _assert_outer_matches_reference(rows, cols, counts, excludes)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_topk_outer_many_sections(device):
    """Active sets of >= 126 x m entries: the reference multisection runs 63 thresholds per round (10 rounds, 60
    bits; the Triton/CUDA kernels run 15 per round)."""
    gen = torch.Generator().manual_seed(11)
    m, n, L = 8, 2000, 3
    rows = [torch.rand(m, generator=gen).to(device) for _ in range(L)]
    cols = [torch.rand(n, generator=gen).to(device) for _ in range(L)]
    cols[1] = torch.randint(0, 7, (n,), generator=gen).float().to(device)  # ties
    excludes = [_random_exclude(m, n, 1100 + 50 * i, gen, device) for i in range(L)]
    counts = [700, 64, 1000]
    _assert_outer_matches_reference(rows, cols, counts, excludes)


def test_batched_topk_outer_rejects_bad_input():
    r, c, e = torch.rand(4), torch.rand(3), torch.tensor([0, 5])
    with pytest.raises(ValueError):
        batched_topk_outer([r, r], [c, torch.rand(4)], [1, 1], [e, e])  # shapes differ
    with pytest.raises(ValueError):
        batched_topk_outer([r], [c], [11], [e])  # k > 12 - 2
    with pytest.raises(TypeError):
        batched_topk_outer([r], [c], [1], [e.float()])
    with pytest.raises(ValueError):
        batched_topk_outer([r], [c], [1, 2], [e])
    assert batched_topk_outer([], [], [], []) == []


# ----------------------------------------------------------------------------------------------- probe
@pytest.fixture(params=["direct", "chunked"])
def block_schedule(request, monkeypatch):
    """Both schedules of the probe's per-block top-k (the chunked one normally runs above 2**25 entries)."""
    import spiel.ops.backends.reference.topk as reference_topk

    if request.param == "chunked":
        monkeypatch.setattr(reference_topk, "_DIRECT_MAX", 0)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
def test_probe_tie_breaking_with_massive_ties(device, block_schedule):
    """Every |gradient| equal (or in two levels): the answer is decided by position alone."""
    out_f, in_f = 12, 10
    for G in (torch.ones(out_f, in_f), torch.where(torch.arange(out_f * in_f).view(out_f, in_f) % 7 == 0, 2.0, 1.0),
              torch.zeros(out_f, in_f)):
        G = G.to(device)
        exclude = torch.arange(3, out_f * in_f, 5, device=device)
        for k in (1, 17, 50, out_f * in_f - exclude.numel()):
            for block in (10, 30, 1 << 24):
                pos, score = top_gradient_entries(G.t().contiguous(), torch.eye(in_f, device=device), exclude, k,
                                                  block)
                flat = G.reshape(-1).abs().cpu()
                free = [p for p in range(out_f * in_f) if p not in set(exclude.tolist())]
                want = sorted(sorted(free, key=lambda p: (-float(flat[p]), p))[:k])
                assert pos.tolist() == want, (k, block)
                assert torch.equal(score.cpu(), flat[want])
    with pytest.raises(ValueError):
        top_gradient_entries(torch.ones(2, 3), torch.ones(2, 4), torch.arange(3), 10)


@pytest.mark.parametrize("device", DEVICES)
def test_probe_matches_brute_force_with_chunk_prefilter(device, block_schedule):
    """Blocks much larger than k (the chunk-maximum prefilter) with ties inside and across chunks."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f = 48, 64
    for trial in range(4):
        G = torch.randint(-6, 7, (out_f, in_f), generator=gen).float()
        if trial == 1:
            G = torch.randint(0, 2, (out_f, in_f), generator=gen).float()  # mostly two values
        if trial == 2:
            G[5:9] = 7.0  # whole rows tied at the top
        exclude = torch.randperm(out_f * in_f, generator=gen)[:300].sort().values.to(device)
        G = G.to(device)
        flat = G.abs().reshape(-1).cpu()
        free = sorted(set(range(out_f * in_f)) - set(exclude.tolist()))
        ranked = sorted(free, key=lambda p: (-float(flat[p]), p))
        for k in (1, 3, 10, 40, 100):
            for block in (1 << 11, 1 << 24):
                pos, score = top_gradient_entries(G.t().contiguous(), torch.eye(in_f, device=device), exclude, k,
                                                  block)
                assert pos.tolist() == sorted(ranked[:k]), (trial, k, block)
                assert torch.equal(score.cpu(), flat[pos.cpu()])


def test_probe_nan_counts_as_zero_and_bf16_inputs_upcast_on_cpu():
    gen = torch.Generator().manual_seed(3)
    go = torch.randn(16, 9, generator=gen)
    x = torch.randn(16, 7, generator=gen)
    go[0, 2] = float("nan")  # row 2 of the gradient is NaN
    pos, _ = top_gradient_entries(go, x, None, 63 - 7, 14)
    assert not (set(range(14, 21)) & set(pos.tolist()))  # NaN row ranks last
    assert set(pos.tolist()) == set(range(63)) - set(range(14, 21))
    gb, xb = go.bfloat16().nan_to_num(0.0), x.bfloat16()
    pos_b, score_b = top_gradient_entries(gb, xb, None, 10)
    ref = (gb.float().t() @ xb.float()).abs().view(-1)
    want = sorted(sorted(range(63), key=lambda p: (-float(ref[p]), p))[:10])
    assert pos_b.tolist() == want and torch.equal(score_b, ref[want])


# ----------------------------------------------------------------------------------------------- the update
SHAPES = [(6, 8, 10), (6, 8, 10), (12, 5, 9), (6, 8, 10), (20, 16, 40), (12, 5, 9)]


def _model(values_dtypes, index_dtypes, seed=0, device="cpu"):
    torch.manual_seed(seed)  # the frozen weights' init
    g = torch.Generator().manual_seed(seed)
    layers = []
    for (out_f, in_f, k), vd, idd in zip(SHAPES, values_dtypes, index_dtypes):
        layer = SparseDeltaLinear(in_f, out_f, num_deltas=k, generator=g, values_dtype=vd).to(device)
        vals = torch.randint(-3, 4, (k,), generator=g).to(vd)  # ties, zeros
        vals[vals == 0] = -0.0
        layer.values.data.copy_(vals.to(device))
        if idd == torch.int64:
            layer.indices = layer.indices.to(torch.int64)
            layer._rebuild_plan()
        layers.append(layer)
    return nn.ModuleList(layers)


def _warm_optimizer(model, opt, seed):
    """One optimizer step with random gradients so the per-slot state is not trivial."""
    g = torch.Generator().manual_seed(seed)
    for layer in model:
        layer.values.grad = torch.randn(layer.values.shape, generator=g).to(layer.values)
    opt.step()
    opt.zero_grad()


def _reference_apply(layer, regrow, optimizer):
    """The per-layer update as SpielScheduler did it before batching."""
    values = layer.values.detach()
    old = layer.indices
    k, n = values.numel(), regrow.numel()
    keep = torch.sort(ops.topk_abs(values, k - n)).values
    merged = torch.cat([old.index_select(0, keep).long(), regrow.to(device=old.device, dtype=torch.int64)])
    new_idx, perm = torch.sort(merged)
    src = torch.cat([keep, torch.full((n,), -1, dtype=torch.int64, device=old.device)]).index_select(0, perm)
    regrown = src < 0
    new_values = values.index_select(0, src.clamp(min=0)).masked_fill_(regrown, 0)
    layer.set_indices(new_idx.to(old.dtype), new_values)  # validated path
    if callable(getattr(optimizer, "reindex", None)):
        optimizer.reindex(layer, src, regrown)
    else:
        _generic_reindex(optimizer, layer.values, src, regrown)


def _assert_same(model_a, opt_a, model_b, opt_b):
    for a, b in zip(model_a, model_b):
        assert a.indices.dtype == b.indices.dtype
        assert torch.equal(a.indices, b.indices)
        assert a.values.dtype == b.values.dtype and torch.equal(a.values, b.values)
        sa, sb = opt_a.state.get(a.values, {}), opt_b.state.get(b.values, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
        idx = a.indices.long()
        assert bool((idx[1:] > idx[:-1]).all())
        # the plan was rebuilt for the new indices: the forward/backward still work and match
        x = torch.randn(3, a.in_features, generator=torch.Generator().manual_seed(0)).to(a.indices.device)
        assert torch.equal(a(x), b(x))


DTYPE_MIXES = [
    ([torch.float32] * 6, [torch.int32] * 6),
    ([torch.float32, torch.bfloat16] * 3, [torch.int32, torch.int32, torch.int64] * 2),
    ([torch.bfloat16] * 6, [torch.int64] * 6),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", range(len(DTYPE_MIXES)))
@pytest.mark.parametrize("optimizer", ["sparse_adamw", "torch_adamw"])
def test_ag_update_matches_per_layer_reference(device, mix, optimizer):
    values_dtypes, index_dtypes = DTYPE_MIXES[mix]
    runs = []
    for batched in (True, False):
        model = _model(values_dtypes, index_dtypes, device=device)
        if optimizer == "sparse_adamw":
            opt = SparseAdamW(model, lr=0.01)
        else:
            opt = torch.optim.AdamW([layer.values for layer in model], lr=0.01)
        _warm_optimizer(model, opt, 1)
        sched = SpielScheduler(model, opt, "ag", total_steps=100, reselection_steps=10, accumulation_steps=2,
                               drop_fraction=0.5, schedule="constant", candidates_per_slot=2)
        gen = torch.Generator().manual_seed(7)
        names, accs = [], []
        for name, layer in sched.layers:
            numel = layer.in_features * layer.out_features
            free = torch.tensor(sorted(set(range(numel)) - set(layer.indices.tolist())))
            c = min(len(free), 2 * sched.num_regrow(layer, 10))
            cand = free[torch.randperm(len(free), generator=gen)[:c]].sort().values
            layer.set_candidates(cand.to(device))
            names.append(name)
            accs.append(_ties((c,), gen, device=device))
        sched._window = {"update": 10, "names": names, "accs": accs}
        if batched:
            sched._update(10)
        else:
            for name, acc in zip(names, accs):
                layer = sched._by_name[name]
                cands = layer.candidates.long()
                n = min(sched.num_regrow(layer, 10), cands.numel())
                regrow = cands.index_select(0, ops.topk_abs(acc, n))
                layer.clear_candidates()
                _reference_apply(layer, regrow, opt)
            sched._window = None
        assert all(layer.candidates is None for layer in model)
        runs.append((model, opt, dict(sched.last_update)))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    assert runs[0][2] == {name: sched.num_regrow(layer, 10) for name, layer in sched.layers}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", range(len(DTYPE_MIXES)))
def test_ma_update_matches_per_layer_reference(device, mix):
    values_dtypes, index_dtypes = DTYPE_MIXES[mix]
    runs = []
    for batched in (True, False):
        model = _model(values_dtypes, index_dtypes, seed=3, device=device)
        opt = SM3(model, lr=0.01)
        _warm_optimizer(model, opt, 2)
        gen = torch.Generator().manual_seed(11)
        for i, layer in enumerate(model):  # crafted accumulators with ties and zeros
            row, col = opt.accumulators(layer)
            if i % 3 == 0:
                row.copy_(_ties(row.shape, gen, 0, 4)), col.copy_(_ties(col.shape, gen, 0, 4))
            elif i % 3 == 1:
                row.copy_(torch.rand(row.shape, generator=gen)), col.copy_(torch.rand(col.shape, generator=gen))
            else:
                row.fill_(1.0), col.zero_()  # every product 0: the per-layer fallback
        sched = SpielScheduler(model, opt, "ma", total_steps=100, reselection_steps=10, drop_fraction=0.4,
                               schedule="constant")
        if batched:
            sched._update(10)
        else:
            for name, layer in sched.layers:
                n = sched.num_regrow(layer, 10)
                row, col = opt.accumulators(layer)
                _reference_apply(layer, ops.topk_outer(row.float(), col.float(), n, exclude=layer.indices), opt)
        runs.append((model, opt))
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


# ----------------------------------------------------------------------------------------------- host syncs
class _SyncCounter(TorchDispatchMode):
    """Counts operations that need the device's results on the host: scalar reads (item/bool/int), data-dependent
    output sizes (nonzero, masked_select, boolean indexing, unique, repeat_interleave without output_size), plus
    ``tolist``/``numpy`` (patched: they bypass the dispatcher). The sddmm plan build (one read of a few counts per
    plan, owned by spiel.ops; none at LoRA-like densities) is not counted."""

    SIZE_OPS = ("aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                "aten::unique_consecutive", "aten::_unique")

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        self.paused = 0
        self.where = []
        counter = self
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)

            def wrapped(t, *a, _original=original, _name=method, **kw):
                counter._hit(_name)
                return _original(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, method, wrapped)
        # plan builds (one read-back each, per layer whose plan is needed) are not counted; the plan decisions
        # (needs_plan_many: one read-back per batch of layers) are
        for fn_name in ("build_plans",):
            original_fn = getattr(plan_module, fn_name)

            def uncounted(*a, _original=original_fn, **kw):
                counter.paused += 1
                try:
                    return _original(*a, **kw)
                finally:
                    counter.paused -= 1
            monkeypatch.setattr(plan_module, fn_name, uncounted)

    def _hit(self, what):
        if not self.paused:
            self.count += 1
            self.where.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::_local_scalar_dense" or name in self.SIZE_OPS:
            self._hit(name)
        elif name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                and kwargs.get("output_size") is None:
            self._hit(name)
        elif name == "aten::index" and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self._hit("boolean index")
        return func(*args, **kwargs)


def _many_layers(n_layers, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 12, 20), (12, 16, 20), (16, 16, 30)]
    model = nn.ModuleList([SparseDeltaLinear(shapes[i % 3][1], shapes[i % 3][0], num_deltas=shapes[i % 3][2],
                                             generator=g) for i in range(n_layers)])
    opt = SparseAdamW(model, lr=0.05) if mode == "ag" else SM3(model, lr=0.05)
    sched = SpielScheduler(model, opt, mode, total_steps=100, reselection_steps=4, accumulation_steps=2,
                           drop_fraction=0.3)
    return model, opt, sched


def _scheduler_syncs(mode, monkeypatch, batch_budget=None):
    """Host syncs of each of 4 scheduler steps (an update at step 4) with 3 and 12 layers: {n_layers: [counts]}.
    The backward (where the AG probe fires) must not sync at all. ``batch_budget``: the drop + regrow's batch
    budget (1: every layer its own batch)."""
    from spiel.scheduler import _replace

    counts = {}
    for n_layers in (3, 12):
        model, opt, sched = _many_layers(n_layers, mode)
        per_step = []
        for step in range(4):
            x = torch.randn(4, 12)
            loss = sum(layer(x if layer.in_features == 12 else torch.randn(4, 16)).pow(2).sum() for layer in model)
            with _SyncCounter(monkeypatch) as probe_syncs:
                loss.backward()  # AG: the probe fires in the backward of step 2
            assert probe_syncs.count == 0, probe_syncs.where
            opt.step()
            if batch_budget is not None:
                monkeypatch.setattr(_replace.batches, "__defaults__", (batch_budget,))
            with _SyncCounter(monkeypatch) as rec:
                sched.step()
            per_step.append(rec.count)
            opt.zero_grad()
            monkeypatch.undo()
        assert sched.last_update and len(sched.last_update) == n_layers
        counts[n_layers] = per_step
    return counts


@pytest.mark.parametrize("mode", ["ag", "ma"])
def test_index_update_host_syncs_do_not_grow_with_layers(mode, monkeypatch):
    counts = _scheduler_syncs(mode, monkeypatch)
    # the step with the update (and, AG, the candidate installation) does a constant number of syncs, the plan
    # decisions of all layers included (one read-back per batch of layers of one shape)
    assert counts[3] == counts[12], counts
    assert max(counts[12]) <= 6, counts


@pytest.mark.parametrize("mode", ["ag"])
def test_index_update_host_syncs_do_not_grow_with_batches(mode, monkeypatch):
    """Every layer its own batch of the drop + regrow (a tiny batch budget, as 7B layers against the real one):
    the plans are still decided with one read-back for the whole update, not one per batch. (MA's batched
    top-k of the outer products reads back a few counts per batch of one shape: not covered here.)"""
    counts = _scheduler_syncs(mode, monkeypatch, batch_budget=1)
    assert counts[3] == counts[12], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["ag", "ma"])
def test_cuda_index_update_syncs(mode, monkeypatch):
    """On CUDA (torch's sync debug mode): the AG probe never synchronises; a scheduler step synchronises only in
    the sddmm plan decisions (one per batch of layers) and builds (one per layer that needs a plan, owned by
    spiel.ops), plus, MA, once per batch of layers."""
    import warnings

    g = torch.Generator(device="cuda").manual_seed(0)
    model = nn.ModuleList([SparseDeltaLinear(64, 48, num_deltas=200, generator=g, device="cuda")
                           for _ in range(6)])
    opt = SparseAdamW(model, lr=0.05) if mode == "ag" else SM3(model, lr=0.05)
    sched = SpielScheduler(model, opt, mode, total_steps=100, reselection_steps=4, accumulation_steps=2,
                           drop_fraction=0.3)
    for fn_name in ("build_plans", "needs_plan_many"):  # the plan decisions and builds read back a few counts
        original_fn = getattr(plan_module, fn_name)

        def unchecked(*a, _original=original_fn, **kw):
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return _original(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        monkeypatch.setattr(plan_module, fn_name, unchecked)
    syncs = []
    for step in range(4):
        x = torch.randn(8, 64, device="cuda")
        loss = sum(layer(x).pow(2).sum() for layer in model)
        if mode == "ag" and step == 1:  # the probe, as the layer's backward calls it
            go, inp = torch.randn(8, 48, device="cuda"), torch.randn(8, 64, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                top_gradient_entries(go, inp, model[0].indices, 50, 1 << 10)
                top_gradient_entries(go.bfloat16(), inp.bfloat16(), model[0].indices, 50)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sched.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs.append(sum("called a synchronizing CUDA operation" in str(w.message) for w in caught))
        opt.zero_grad()
    assert len(sched.last_update) == 6
    assert syncs[:3] == [0, 0, 0] and syncs[3] <= (1 if mode == "ma" else 0), syncs


# ----------------------------------------------------------------------------------------------- batched install
def _install_fixture(optimizer, n_layers=7, seed=0, merged_for_training=True, device="cpu"):
    """Layers of three shapes sharing k (values fp32/bf16/fp16, int32/int64 indices, one merged for training),
    the optimizer warmed by two steps, gradients set, and the regrown positions [L, n] of one update."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    shapes, k, n = [(6, 8), (12, 5), (10, 10)], 20, 6
    vdt = [torch.float32, torch.bfloat16, torch.float16]
    layers = nn.ModuleList()
    for i in range(n_layers):
        out_f, in_f = shapes[i % 3]
        layer = SparseDeltaLinear(in_f, out_f, num_deltas=k, generator=g, values_dtype=vdt[i % 3])
        if i % 2:
            layer.indices = layer.indices.to(torch.int64)
            layer._rebuild_plan()
        layers.append(layer.to(device))
    if merged_for_training:
        layers[3].merge_(train=True)
    if optimizer == "sparse_adamw":
        opt = SparseAdamW(layers, lr=0.1)
    elif optimizer == "sparse_adamw_bf16":
        opt = SparseAdamW(layers, lr=0.1, state_dtype=torch.bfloat16, betas=(0.9, 0.9999))  # int32 steps
    elif optimizer == "sm3":
        opt = SM3(layers, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW([layer.values for layer in layers], lr=0.1, eps=1e-3)  # fp16 values: no 0/0
    for step in range(3):
        for layer in layers:
            layer.values.grad = _ties((k,), g, dtype=layer.values.dtype, device=device)  # ties in |values|
        if step < 2:
            opt.step()
    regrown = []
    for layer in layers:
        free = torch.ones(layer.in_features * layer.out_features, dtype=torch.bool)
        free[layer.indices.long().cpu()] = False
        pool = free.nonzero().view(-1)
        regrown.append(pool[torch.randperm(pool.numel(), generator=g)[:n]].sort().values)
    return layers, opt, torch.stack(regrown).to(device)


def _bits(t):
    """The tensor's bit pattern (-0.0 and NaN payloads included)."""
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class _PerLayerOptimizer:
    """The optimizer as the per-layer path sees it: its state and ``reindex`` (if any), no ``reindex_many``."""

    def __init__(self, opt):
        self.state = opt.state
        if hasattr(opt, "reindex"):
            self.reindex = opt.reindex


def _per_layer_set_indices(layers, indices, values):
    for layer, idx, vals in zip(layers, indices.unbind(0), values.unbind(0)):
        replace.set_indices_trusted(layer, idx, vals)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sparse_adamw", "sparse_adamw_bf16", "sm3", "torch_adamw"])
def test_drop_and_regrow_batched_install_matches_per_layer(device, optimizer, monkeypatch):
    """set_indices_many + reindex_many leave every layer and the optimizer exactly as the per-layer
    set_indices(validate=False) + reindex did: indices, values, Parameter identity and version counters, grads,
    plans, merged-for-training weights, optimizer state (dtypes included)."""
    runs = []
    for batched in (True, False):
        layers, opt, regrown = _install_fixture(optimizer, device=device)
        params = [layer.values for layer in layers]
        with monkeypatch.context() as m:
            if not batched:
                m.setattr(replace, "set_indices_trusted_many", _per_layer_set_indices)
            replace.drop_and_regrow(list(layers), regrown, opt if batched else _PerLayerOptimizer(opt),
                                    _generic_reindex)
        assert all(layer.values is p for layer, p in zip(layers, params))
        runs.append((layers, opt))
    (la, oa), (lb, ob) = runs
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1)).to(device)
    for a, b in zip(la, lb):
        assert a.indices.dtype == b.indices.dtype and torch.equal(a.indices, b.indices)
        assert a.values.dtype == b.values.dtype and torch.equal(_bits(a.values), _bits(b.values))
        assert a.values._version == b.values._version and a.indices._version == b.indices._version
        assert a.values.grad is None and b.values.grad is None and a.values.requires_grad and a.values.is_leaf
        assert (a.sddmm_plan is None) == (b.sddmm_plan is None)
        if a.sddmm_plan is not None:
            assert torch.equal(a.sddmm_plan, b.sddmm_plan)
        assert a.train_merged == b.train_merged
        if a.merged:
            assert torch.equal(a.merge_saved, b.merge_saved) and torch.equal(a.weight, b.weight)
        sa, sb = oa.state.get(a.values, {}), ob.state.get(b.values, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype and torch.equal(_bits(sa[key]), _bits(sb[key])), key
        xi = x[:, :a.in_features]
        assert torch.equal(_bits(a(xi)), _bits(b(xi)))
        if a.merged:
            assert torch.equal(a.weight, b.weight)
    for a, b in zip(la, lb):  # and training goes on identically
        a.values.grad = b.values.grad = torch.ones_like(a.values)
    oa.step()
    ob.step()
    for a, b in zip(la, lb):
        assert torch.equal(_bits(a.values), _bits(b.values))


def test_set_indices_many_refuses_a_layer_merged_for_inference_before_any_change():
    layers, _, regrown = _install_fixture("torch_adamw", merged_for_training=False)
    layers[4].merge_()
    before = [layer.indices.clone() for layer in layers]
    k = layers[0].indices.numel()
    new = torch.stack([torch.arange(k)] * len(layers))
    with pytest.raises(RuntimeError, match="merged"):
        set_indices_many(list(layers), new, torch.zeros(len(layers), k))
    assert all(torch.equal(layer.indices, b) for layer, b in zip(layers, before))


class _OpCounter(TorchDispatchMode):
    """Counts aten ops (all, and those that are no view: the ones that may launch a kernel); paused while
    ``paused`` is set (the sddmm plans: built per layer by spiel.ops)."""

    def __init__(self):
        super().__init__()
        self.all = self.compute = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.all += 1
            self.compute += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["sparse_adamw", "sm3"])
def test_drop_and_regrow_ops_do_not_grow_with_layers(optimizer, monkeypatch):
    """The update of a batch of layers issues a fixed number of compute ops whatever L (the per-layer path issued
    ~10 per layer: a copy of indices and values, a gather and a fill per state tensor); what still grows is one
    ``.data`` alias per layer (no kernel), and the sddmm plans (spiel.ops', not counted)."""
    counts = {}
    for n_layers in (12, 48):  # both hold all six (values, index) dtype pairs: one op call per pair
        layers, opt, regrown = _install_fixture(optimizer, n_layers=n_layers, merged_for_training=False)
        counter = _OpCounter()
        rebuild = replace.rebuild_plans

        def uncounted(layers, _rebuild=rebuild):
            counter.paused = True
            try:
                _rebuild(layers)
            finally:
                counter.paused = False
        monkeypatch.setattr(replace, "rebuild_plans", uncounted)
        with counter:
            replace.drop_and_regrow(list(layers), regrown, opt, _generic_reindex)
        monkeypatch.undo()
        counts[n_layers] = (counter.all, counter.compute)
    (all4, compute4), (all40, compute40) = counts[12], counts[48]
    # values of three dtypes and indices of two: a cast each per batch, not per layer
    assert compute40 <= compute4 + 4, counts
    assert all40 - all4 <= 2 * 36, counts


def test_index_updates_build_unbalanced_plans_and_set_indices_balanced_ones():
    """The scheduler's updates rebuild plans without the bank-conflict balancing (it costs more than it saves
    over S steps); a user's set_indices builds the balanced plan."""
    from spiel.ops.backends import sddmm_plan as P
    from spiel.optim import SparseAdamW
    from spiel.scheduler import SpielScheduler

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    layers = nn.ModuleList([SparseDeltaLinear(4096, 4096, num_deltas=16000, generator=g) for _ in range(2)])
    assert all(layer.sddmm_plan is not None for layer in layers)  # 0.1%: the sparse strategy needs a plan
    for layer in layers:
        assert torch.equal(layer.sddmm_plan, P.build_plan(layer.indices, 4096, 4096))  # balanced
    opt = SparseAdamW(layers, lr=0.01)
    sched = SpielScheduler(layers, opt, "ag", total_steps=100, reselection_steps=3, accumulation_steps=1)
    for _ in range(3):
        x = torch.randn(4, 4096)
        sum(layer(x).sum() for layer in layers).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert sched.last_update
    for layer in layers:
        unbalanced = P.build_plan(layer.indices, 4096, 4096, balance=False)
        assert torch.equal(layer.sddmm_plan, unbalanced)
        assert not torch.equal(unbalanced, P.build_plan(layer.indices, 4096, 4096))  # balancing moves lanes here
