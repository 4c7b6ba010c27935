"""``needs_plan`` agrees with the full plan build: False exactly when the built plan would choose dense_blas
for both backends without compaction (then the layer keeps no plan and sddmm runs that strategy)."""
import pytest
import torch

from spiel.nn import SparseDeltaLinear
from spiel.ops.backends import sddmm_plan as P


def _indices(out_f, in_f, k, kind, gen):
    if kind == "random":
        return torch.randperm(out_f * in_f, generator=gen)[:k].sort().values
    rows = torch.randperm(out_f, generator=gen)[: max(1, out_f // 10)]
    cols = torch.randperm(in_f, generator=gen)[: max(1, in_f // 10)]
    pool = (rows[:, None] * in_f + cols[None, :]).reshape(-1)
    return pool[torch.randperm(pool.numel(), generator=gen)[: min(k, pool.numel())]].sort().values


@pytest.mark.parametrize("out_f,in_f", [(512, 768), (1000, 300), (2048, 512)])
@pytest.mark.parametrize("density", [0.0005, 0.005, 0.03, 0.2])
@pytest.mark.parametrize("kind", ["random", "concentrated"])
def test_needs_plan_matches_full_build(out_f, in_f, density, kind):
    gen = torch.Generator().manual_seed(out_f + int(density * 1e4))
    idx = _indices(out_f, in_f, max(1, int(density * out_f * in_f)), kind, gen).to(torch.int32)
    info = P.plan_code(P.build_plan(idx, out_f, in_f), idx.numel(), out_f, in_f)
    blas_only = info["triton"] == info["cuda"] == "dense_blas" and info["level_r"] == info["level_c"] == 0
    assert P.needs_plan(idx, out_f, in_f) == (not blas_only)


def test_layer_keeps_no_plan_at_lora_density_and_one_at_low_density():
    dense = SparseDeltaLinear(1024, 4096, bias=False, num_deltas=64 * (4096 + 1024))  # W [4096, 1024]
    assert dense.sddmm_plan is None
    sparse = SparseDeltaLinear(1024, 1024, bias=False, density=0.0005)
    assert sparse.sddmm_plan is not None
    x = torch.randn(5, 1024)
    dense(x).sum().backward()
    want = (torch.ones(5, 4096).t() @ x).view(-1)[dense.indices.long()]
    torch.testing.assert_close(dense.values.grad, want)


def test_needs_plan_many_matches_one_at_a_time_with_one_read_back(monkeypatch):
    """The batched decision (one device-to-host read for all items) equals the per-item one, k = 0 included."""
    gen = torch.Generator().manual_seed(7)
    items = []
    for (out_f, in_f), density, kind in [((512, 768), 0.0005, "random"), ((1000, 300), 0.03, "random"),
                                         ((2048, 512), 0.005, "concentrated"), ((512, 768), 0.2, "random")]:
        idx = _indices(out_f, in_f, max(1, int(density * out_f * in_f)), kind, gen)
        items.append((idx.to(torch.int64 if kind == "random" else torch.int32), out_f, in_f))
    items.append((torch.empty(0, dtype=torch.int32), 64, 64))
    want = [P.needs_plan(*item) for item in items]
    assert True in want and False in want  # both answers are exercised
    reads = []
    original = torch.Tensor.tolist

    def counted(t, *a, **kw):
        reads.append(t.shape)
        return original(t, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    assert P.needs_plan_many(items) == want
    assert len(reads) == 1


def test_rebuild_sddmm_plans_matches_per_layer_rebuild():
    from spiel.nn import rebuild_sddmm_plans

    torch.manual_seed(0)
    layers = [SparseDeltaLinear(1024, 4096, bias=False, num_deltas=64 * (4096 + 1024)),
              SparseDeltaLinear(1024, 1024, bias=False, density=0.0005),
              SparseDeltaLinear(300, 200, bias=False, density=0.01)]
    want = [None if layer.sddmm_plan is None else layer.sddmm_plan.clone() for layer in layers]
    for layer in layers:
        layer.sddmm_plan = torch.full((3,), -1, dtype=torch.int32)  # stale
    rebuild_sddmm_plans(layers)
    for layer, plan in zip(layers, want):
        assert (layer.sddmm_plan is None) == (plan is None)
        if plan is not None:
            assert torch.equal(layer.sddmm_plan, plan)


@pytest.mark.parametrize("budget", [None, 1000])
def test_presence_counts_batched_match_a_direct_count(monkeypatch, budget):
    """Layers of one shape and k are counted together (in chunks of COUNT_BATCH_ELEMENTS entries): the counts
    equal a direct count of distinct tiles, rows and columns per layer, for int32 and int64 indices."""
    if budget is not None:
        monkeypatch.setattr(P, "COUNT_BATCH_ELEMENTS", budget)
    gen = torch.Generator().manual_seed(3)
    items = []
    for (out_f, in_f), k, n_layers in [((300, 200), 600, 5), ((1000, 300), 37, 3), ((129, 257), 1, 2),
                                       ((2048, 512), 4000, 1)]:
        for j in range(n_layers):
            kind = "random" if j % 2 == 0 else "concentrated"
            idx = _indices(out_f, in_f, k, kind, gen)
            items.append((idx.to(torch.int32 if j % 3 else torch.int64), out_f, in_f))
    items.append((torch.empty(0, dtype=torch.int64), 64, 64))
    got = P.presence_counts(items)
    assert set(got) == set(range(len(items) - 1))  # k = 0 has no counts
    for i, (idx, out_f, in_f) in enumerate(items[:-1]):
        r, c = idx.long() // in_f, idx.long() % in_f
        ntr, ntc = P.grid_dims(out_f, in_f)
        tiles = ((r // P.TILE) * ntc + c // P.TILE).unique().numel()
        assert got[i] == [tiles, r.unique().numel(), c.unique().numel()], i


@pytest.mark.parametrize("out_f,in_f", [(512, 768), (1000, 300), (2048, 512), (4096, 1024)])
def test_no_plan_stays_no_plan_when_indices_are_added(out_f, in_f):
    """What the AG scheduler relies on when it installs candidates without deciding the plan again: an index set
    that needs no plan (dense_blas for both backends, no compaction) still needs none with more indices added
    (random ones, or ones concentrated in 10% of rows and columns), at every density. (A concentrated set alone
    always needs a plan: its compaction.)"""
    kind = "random"
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    numel = out_f * in_f
    seen_no_plan = 0
    for density in (0.0005, 0.002, 0.005, 0.01, 0.03, 0.1):
        idx = _indices(out_f, in_f, max(1, int(density * numel)), kind, gen)
        if P.needs_plan(idx.to(torch.int32), out_f, in_f):
            continue
        seen_no_plan += 1
        for extra_kind in ("random", "concentrated"):
            for extra_fraction in (0.05, 0.2, 1.0):
                extra = _indices(out_f, in_f, max(1, int(extra_fraction * idx.numel())), extra_kind, gen)
                union = torch.unique(torch.cat([idx, extra])).to(torch.int32)
                assert not P.needs_plan(union, out_f, in_f), (density, extra_kind, extra_fraction)
    assert seen_no_plan >= 1  # the property was exercised


# ---- row plans (the CUDA wgmma dense_tile on sorted indices without a full plan) ------------------------------

@pytest.mark.parametrize("out_f,in_f,k,dtype", [(300, 500, 1000, torch.int32), (7, 9, 63, torch.int64),
                                                (64, 64, 0, torch.int32), (1000, 3, 5, torch.int64)])
def test_row_plan_starts(out_f, in_f, k, dtype):
    gen = torch.Generator().manual_seed(out_f + k)
    idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values.to(dtype)
    plan = P.build_row_plan(idx, out_f, in_f)
    assert plan.dtype == torch.int32 and plan.numel() == P.row_plan_len(out_f) and P.is_row_plan(plan, out_f)
    assert int(plan[P.H_MAGIC]) == P.ROW_MAGIC and int(plan[P.H_K]) == k
    want = torch.tensor([int((idx.long() < r * in_f).sum()) for r in range(out_f + 1)])
    assert torch.equal(plan[P.HDR:].long(), want)
    if k:  # a full plan is never taken for a row plan (it holds >= 2 (out + in) entries)
        assert not P.is_row_plan(P.build_plan(idx, out_f, in_f), out_f)
    assert not P.is_row_plan(None, out_f)


def test_build_row_plans_batched():
    """Many layers at once (boundaries shared per shape, k and dtype): each plan equals its own build, and the
    plans are separate tensors."""
    gen = torch.Generator().manual_seed(5)
    items = []
    for out_f, in_f, k, dtype in [(64, 96, 300, torch.int32), (64, 96, 300, torch.int32), (64, 96, 300, torch.int64),
                                  (33, 17, 40, torch.int32), (64, 96, 0, torch.int32)]:
        idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values.to(dtype)
        items.append((idx, out_f, in_f))
    plans = P.build_row_plans(items)
    assert len(plans) == len(items)
    for plan, (idx, out_f, in_f) in zip(plans, items):
        assert torch.equal(plan, P.build_row_plan(idx, out_f, in_f))
        want = torch.tensor([int((idx.long() < r * in_f).sum()) for r in range(out_f + 1)])
        assert torch.equal(plan[P.HDR:].long(), want) and int(plan[P.H_K]) == idx.numel()
    assert plans[0].data_ptr() != plans[1].data_ptr()
    assert P.build_row_plans([]) == []
    with pytest.raises(TypeError, match="int32 or int64"):
        P.build_row_plan(items[0][0].to(torch.int16), 64, 96)


def test_row_plans_in_layers(monkeypatch):
    """Where the CUDA wgmma kernel would run (faked here on the CPU), rebuild_sddmm_plans gives a plan-free layer
    a row plan, and none while candidates are set; candidates installed without a rebuild never see the row
    plan (it describes the sorted indices alone); the gradients are unchanged."""
    import spiel.ops.linear as L

    monkeypatch.setattr(P, "cuda_wgmma", lambda device: True)
    torch.manual_seed(0)
    layer = SparseDeltaLinear(512, 1024, bias=False, density=0.03)  # plan-free (cuBLAS bands) at this density
    with torch.no_grad():
        layer.values.normal_()
    assert P.is_row_plan(layer.sddmm_plan, 1024)
    seen = []
    real = L._sddmm
    monkeypatch.setattr(L, "_sddmm", lambda go, x, idx, o, i, plan: seen.append((idx.numel(), plan)) or
                        real(go, x, idx, o, i, plan))
    x = torch.randn(5, 512)
    layer(x).square().sum().backward()
    got = layer.values.grad.clone()
    assert seen[-1][1] is layer.sddmm_plan
    layer.values.grad = None
    plan, layer.sddmm_plan = layer.sddmm_plan, None
    layer(x).square().sum().backward()
    torch.testing.assert_close(got, layer.values.grad)
    layer.sddmm_plan = plan
    # candidates without a rebuild (the scheduler's trusted path): the op gets no plan for cat(indices, candidates)
    free = torch.tensor(sorted(set(range(4096)) - set(layer.indices.tolist()))[:50], dtype=layer.indices.dtype)
    layer.set_candidates(free, rebuild_plan=False)
    layer(x).square().sum().backward()
    assert seen[-1] == (layer.indices.numel() + 50, None)
    layer._rebuild_plan()
    assert layer.sddmm_plan is None  # candidates set: no row plan
    layer.clear_candidates()
    assert P.is_row_plan(layer.sddmm_plan, 1024)
