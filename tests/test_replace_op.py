"""``spiel.ops.drop_regrow_indices`` on the reference backend against a per-row Python truth (sorted with
explicit keys), with ties, NaN, every dtype, n = 0 and n = k; schema (opcheck); bad input. The CUDA kernel is
compared with this backend in tests/gpu/test_replace_gpu.py."""
import math

import pytest
import torch

import spiel.ops as ops

VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INDEX_DTYPES = [torch.int32, torch.int64]


def truth(values, indices, regrown):
    """Per row in Python: keep the k - n largest fp32 |value| (NaN largest; ties: smaller slot stays), merge."""
    new_rows, order_rows = [], []
    for v, idx, reg in zip(values, indices, regrown.tolist()):
        mags = v.detach().float().abs().tolist()
        k, n = len(mags), len(reg)
        # NaN first (the largest), then by magnitude descending, then by slot (the smaller slot stays)
        ranked = sorted(range(k), key=lambda s: (0, 0.0, s) if math.isnan(mags[s]) else (1, -mags[s], s))
        kept = sorted(ranked[:k - n])
        pos = idx.tolist()
        merged = sorted([(pos[s], s) for s in kept] + [(r, -1) for r in reg])
        new_rows.append([p for p, _ in merged])
        order_rows.append([s for _, s in merged])
    return new_rows, order_rows


def make_case(L, k, n, space, value_dtype, index_dtype, g, *, ties=False, nans=False, kind=None):
    """L rows of k sorted unique indices out of ``space`` and n regrown positions outside them. ``kind``:
    "equal" (one magnitude, both signs: every row one long tie), "zeros" (+-0), "gap" (the regrown positions all
    in one gap between two indices), "ends" (regrown below the first and above the last index)."""
    values, indices, regrown = [], [], []
    for _ in range(L):
        if kind == "gap":  # indices outside [space // 2, space // 2 + 2n), regrown inside it
            lo = space // 2
            outside = torch.cat([torch.arange(lo), torch.arange(lo + 2 * n, space)])
            idx = outside[torch.randperm(outside.numel(), generator=g)[:k]].sort().values
            reg = (lo + torch.randperm(2 * n, generator=g)[:n]).sort().values
        elif kind == "ends":  # indices in the middle third, regrown in the outer thirds
            third = space // 3
            idx = (third + torch.randperm(third, generator=g)[:k]).sort().values
            outer = torch.cat([torch.arange(third), torch.arange(2 * third, space)])
            reg = outer[torch.randperm(outer.numel(), generator=g)[:n]].sort().values
        else:
            perm = torch.randperm(space, generator=g)
            idx, reg = perm[:k].sort().values, perm[k:k + n].sort().values
        indices.append(idx.to(index_dtype))
        regrown.append(reg)
        v = torch.randn(k, generator=g, dtype=torch.float64)
        if ties:  # few distinct magnitudes, both signs: many ties, also across the keep/drop line
            v = (torch.randint(-3, 4, (k,), generator=g).to(torch.float64)) * 0.25
        if kind == "equal":
            v = torch.where(torch.rand(k, generator=g) < 0.5, -0.75, 0.75).to(torch.float64)
        if kind == "zeros":
            v = torch.where(torch.rand(k, generator=g) < 0.5, -0.0, 0.0).to(torch.float64)
        if nans and k:
            v[torch.randint(0, k, (max(1, k // 10),), generator=g)] = float("nan")
            v[torch.randint(0, k, (max(1, k // 20),), generator=g)] = float("-inf")
        values.append(v.to(value_dtype))
    return values, indices, torch.stack(regrown) if L else torch.empty(0, n, dtype=torch.int64)


#: cases the CUDA kernel is checked on (tests/gpu/test_replace_gpu.py, tests/gpu/sanitize_replace.py):
#: (L, k, n, space, kind); chunks of 2048 entries, histogram spans of 32768, 64 rows per launch
GPU_CASES = [
    (1, 1, 1, 3, None), (3, 17, 5, 60, None), (2, 5000, 1000, 20000, None), (70, 300, 37, 1000, None),
    (2, 9000, 3000, 30000, "equal"), (2, 4500, 700, 9000, "zeros"), (3, 6000, 1500, 20000, "ties"),
    (2, 7000, 1400, 40000, "nan"), (2, 4100, 4100, 9000, None), (2, 3000, 0, 9000, None),
    (2, 10000, 5000, 50000, "gap"), (2, 5000, 2500, 30000, "ends"), (4, 300_000, 60_000, 3_000_000, None),
]


def check_replace(kernel, device, cases=GPU_CASES, value_dtypes=(torch.float32, torch.bfloat16, torch.float16),
                  index_dtypes=INDEX_DTYPES) -> int:
    """``kernel(values, indices, regrown)`` on ``device`` equal to the reference backend on the CPU, with the
    memory the outputs will get poisoned first (freed to the caching allocator just before the call)."""
    from spiel.ops._dispatch import kernel_for

    reference = kernel_for("drop_regrow_indices", "torch")
    checks = 0
    for case_no, (L, k, n, space, kind) in enumerate(cases):
        for value_dtype in value_dtypes:
            for index_dtype in index_dtypes:
                g = torch.Generator().manual_seed(case_no)
                values, indices, regrown = make_case(L, k, n, space, value_dtype, index_dtype, g,
                                                     ties=kind == "ties", nans=kind == "nan",
                                                     kind=kind if kind not in ("ties", "nan") else None)
                want = reference(values, indices, regrown)
                on = lambda ts: [t.to(device) for t in ts]  # noqa: E731
                poison = torch.full((4 * L * k + 1024,), -7, dtype=torch.int64, device=device)
                del poison
                got = kernel(on(values), on(indices), regrown.to(device))
                label = f"case {case_no} {(L, k, n, kind)} {value_dtype} {index_dtype}"
                assert got[0].dtype == index_dtype and got[1].dtype == torch.int64, label
                assert torch.equal(got[0].cpu(), want[0]), f"new_indices differ: {label}"
                assert torch.equal(got[1].cpu(), want[1]), f"order differs: {label}"
                checks += 1
    return checks


def _assert_matches_truth(values, indices, regrown, index_dtype):
    new_indices, order = ops.drop_regrow_indices(values, indices, regrown)
    want_idx, want_order = truth(values, indices, regrown)
    assert new_indices.dtype == index_dtype and order.dtype == torch.int64
    assert new_indices.tolist() == want_idx
    assert order.tolist() == want_order


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("L,k,n,space", [(1, 1, 1, 3), (3, 17, 5, 60), (2, 100, 0, 300), (4, 64, 64, 200),
                                         (2, 301, 60, 5000), (5, 33, 1, 40)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_python_truth(value_dtype, index_dtype, L, k, n, space, ties):
    g = torch.Generator().manual_seed(L * 1000 + k + n)
    values, indices, regrown = make_case(L, k, n, space, value_dtype, index_dtype, g, ties=ties, nans=not ties)
    _assert_matches_truth(values, indices, regrown, index_dtype)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("L,k,n,space", [(2, 301, 60, 5000), (5, 33, 1, 400), (4, 64, 64, 1000)])
@pytest.mark.parametrize("kind", ["equal", "zeros", "gap", "ends"])
def test_layouts_match_python_truth(value_dtype, index_dtype, L, k, n, space, kind):
    """One long tie per row, +-0, regrown crowded into one gap, regrown outside the indices' range."""
    g = torch.Generator().manual_seed(L * 1000 + k + n)
    values, indices, regrown = make_case(L, k, n, space, value_dtype, index_dtype, g, kind=kind)
    _assert_matches_truth(values, indices, regrown, index_dtype)


def test_values_move_with_order():
    g = torch.Generator().manual_seed(5)
    values, indices, regrown = make_case(3, 50, 10, 400, torch.float32, torch.int64, g)
    new_indices, order = ops.drop_regrow_indices(values, indices, regrown)
    for v, idx, new, o in zip(values, indices, new_indices, order):
        kept = o >= 0
        assert torch.equal(new[kept], idx[o[kept]])  # a kept slot's index is its old slot's index
        # the dropped ones are the 10 smallest |value|
        dropped = torch.ones(50, dtype=torch.bool)
        dropped[o[kept]] = False
        assert v[dropped].abs().max() <= v[~dropped].abs().min()


def test_opcheck():
    g = torch.Generator().manual_seed(1)
    values, indices, regrown = make_case(2, 40, 7, 200, torch.float32, torch.int32, g)
    torch.library.opcheck(torch.ops.spiel.drop_regrow_indices, (values, indices, regrown))


def test_bad_input():
    g = torch.Generator().manual_seed(2)
    values, indices, regrown = make_case(2, 10, 3, 50, torch.float32, torch.int64, g)
    with pytest.raises(TypeError, match="values must be a non-empty list"):
        ops.drop_regrow_indices([], [], regrown)
    with pytest.raises(ValueError, match="same length"):
        ops.drop_regrow_indices(values, indices[:1], regrown)
    with pytest.raises(ValueError, match="regrown must be int64"):
        ops.drop_regrow_indices(values, indices, regrown.int())
    with pytest.raises(ValueError, match="at most k"):
        ops.drop_regrow_indices(values, indices, torch.arange(22).view(2, 11))
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.drop_regrow_indices(values, [i.float() for i in indices], regrown)
    with pytest.raises(TypeError, match="floating-point"):
        ops.drop_regrow_indices([v.long() for v in values], indices, regrown)
    with pytest.raises(TypeError, match="dtypes"):
        ops.drop_regrow_indices([values[0], values[1].half()], indices, regrown)
    with pytest.raises(ValueError, match="1-D of k"):
        ops.drop_regrow_indices([values[0], values[1][:5]], indices, regrown)
    with pytest.raises(ValueError, match="ascending and unique"):
        ops.drop_regrow_indices(values, [indices[0].flip(0), indices[1]], regrown)
    with pytest.raises(ValueError, match="ascending and unique"):
        ops.drop_regrow_indices(values, indices, regrown.flip(1))
    clash = regrown.clone()
    clash[0, 0] = indices[0][0]
    clash[0] = clash[0].sort().values
    with pytest.raises(ValueError, match="already in indices"):
        ops.drop_regrow_indices(values, indices, clash)


def test_reference_against_itself_on_the_gpu_cases():
    """The GPU cases' layouts are valid inputs (sorted, unique, disjoint) and the reference runs them (CPU)."""
    from spiel.ops._dispatch import kernel_for

    small = [c for c in GPU_CASES if c[0] * c[1] <= 50_000]
    with ops.use_backend("torch"):
        for case_no, (L, k, n, space, kind) in enumerate(small):
            g = torch.Generator().manual_seed(case_no)
            values, indices, regrown = make_case(L, k, n, space, torch.float32, torch.int64, g, ties=kind == "ties",
                                                 nans=kind == "nan", kind=kind if kind not in ("ties", "nan") else None)
            new_indices, order = ops.drop_regrow_indices(values, indices, regrown)  # validates the inputs
            if L * k <= 20_000:
                want_idx, want_order = truth(values, indices, regrown)
                assert new_indices.tolist() == want_idx and order.tolist() == want_order
    assert kernel_for("drop_regrow_indices", "torch") is not None
