"""The batched plan build (``sddmm_plan.build_plans``) against the single-plan build it replaced
(``tests/plan_reference.py``): the same int32 plans, element for element, for every kind of index set."""
import pytest
import torch

from tests.plan_reference import build_plan_reference
from spiel.ops.backends import sddmm_plan as P


def _random(out_f, in_f, k, seed, dtype=torch.int32, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(out_f * in_f, generator=g)[:k]
    idx = idx if shuffle else idx.sort().values
    return idx.to(dtype)


def _concentrated(out_f, in_f, seed, frac=0.1):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(out_f, generator=g)[: max(1, int(out_f * frac))]
    cols = torch.randperm(in_f, generator=g)[: max(1, int(in_f * frac))]
    return (rows[:, None] * in_f + cols[None, :]).reshape(-1).sort().values.to(torch.int32)


CASES = [
    # (name, out, in, indices): random densities, odd shapes, several superblocks and items, compaction, k edges
    ("random 1%", 300, 257, _random(300, 257, 771, 0)),
    ("random 1% again", 300, 257, _random(300, 257, 771, 1)),
    ("random 1% int64 unsorted", 300, 257, _random(300, 257, 771, 2, torch.int64, shuffle=True)),
    ("random 10%", 97, 131, _random(97, 131, 1270, 3)),
    ("two superblocks, many items", 4100, 40, _random(4100, 40, 20000, 4)),
    ("wide, several items per superblock", 33, 2300, _random(33, 2300, 18000, 5)),
    ("concentrated (compacted)", 600, 520, _concentrated(600, 520, 6)),
    ("rows only (row compaction)", 1000, 64, (torch.arange(5)[:, None] * 64 + torch.arange(64)).reshape(-1).int()),
    ("k = 0", 50, 70, torch.empty(0, dtype=torch.int32)),
    ("k = out * in", 19, 23, torch.arange(19 * 23, dtype=torch.int32)),
    ("k = 1", 129, 130, torch.tensor([129 * 130 - 1], dtype=torch.int32)),
]


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("kw", [{}, {"compaction": False}, {"cuda": "sparse", "triton": "dense_tile"},
                                {"T_hint": 128}])
def test_build_plans_equals_single_builds(balance, kw):
    items = [(idx, o, i) for _, o, i, idx in CASES]
    got = P.build_plans(items, balance=balance, **kw)
    assert len(got) == len(items)
    for (name, o, i, idx), plan in zip(CASES, got):
        ref = build_plan_reference(idx, o, i, balance=balance, **kw)
        assert plan.dtype == torch.int32 and plan.is_contiguous()
        assert torch.equal(plan, ref), name
        assert torch.equal(P.build_plan(idx, o, i, balance=balance, **kw), ref), name


def test_build_plans_batches_and_chunks(monkeypatch):
    """Many layers of one shape and k form [L, k] batches, cut at PLAN_BATCH_ELEMENTS; mixed shapes, k and index
    dtypes in one call; every plan its own storage."""
    monkeypatch.setattr(P, "PLAN_BATCH_ELEMENTS", 2000)  # 3 layers of 771 per batch
    items = [(_random(300, 257, 771, s), 300, 257) for s in range(7)]
    items += [(_random(97, 131, 1270, 10 + s, torch.int64), 97, 131) for s in range(3)]
    items += [(_concentrated(600, 520, 20), 600, 520), (torch.empty(0, dtype=torch.int32), 8, 8)]
    got = P.build_plans(items)
    for (idx, o, i), plan in zip(items, got):
        assert torch.equal(plan, build_plan_reference(idx, o, i))
    ptrs = {p.untyped_storage().data_ptr() for p in got}
    assert len(ptrs) == len(got)


def test_build_plans_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        P.build_plans([(torch.arange(3, dtype=torch.int32), 4, 4)], cuda="dense")
