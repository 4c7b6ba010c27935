"""``spiel.ops.outer_threshold`` (SpIEL-MA's threshold multisection): the reference backend against a Python
truth written from the contract (plain float arithmetic, cells counted one by one), on ties, rows without a
positive score, layers of different exclusion counts, int32/int64 keys, 1-63 sections, 0-12 rounds; the
Triton kernel (interpreter) against the reference, bit for bit; schema (opcheck); bad input. The CUDA kernel
is compared in tests/gpu/test_outer_threshold_gpu.py with ``check_threshold``."""
import math
import sys

import pytest
import torch

import interpreted
import spiel.ops as ops


def make_case(L, m, n, g, *, key_dtype=torch.int64, kind=None, excluded=None):
    """L layers of m x n cells: rows >= 0 (some zero), cols descending, a random excluded set per layer (its own
    size), keys padded with m * n, and `need` from 0 to past the available count. ``kind``: "ties" (scores from
    three values), "zero_layer" (one layer all zero: hi = 0), "dense" (most cells excluded)."""
    mn = m * n
    rows = torch.rand(L, m, generator=g, dtype=torch.float64)
    cols = torch.rand(L, n, generator=g, dtype=torch.float64)
    if kind == "ties":
        rows = torch.randint(0, 3, (L, m), generator=g).to(torch.float64) * 0.5
        cols = torch.randint(1, 4, (L, n), generator=g).to(torch.float64) * 0.25
    rows[torch.rand(L, m, generator=g) < 0.15] = 0.0
    cols = cols.sort(dim=1, descending=True).values
    if kind == "zero_layer":
        rows[0] = 0.0
    key_rows, need = [], []
    for layer in range(L):
        share = 0.8 if kind == "dense" else 0.3
        count = excluded[layer] if excluded is not None else int(torch.randint(0, int(share * mn) + 1, (1,),
                                                                               generator=g))
        key_rows.append(torch.randperm(mn, generator=g)[:count].sort().values)
        available = mn - count
        need.append([0, 1, available // 3, available, available + 2][layer % 5] if available else layer % 2)
    width = max(1, max(k.numel() for k in key_rows))
    keys = torch.full((L, width), mn, dtype=torch.int64)
    for layer, k in enumerate(key_rows):
        keys[layer, :k.numel()] = k
    row_start = torch.searchsorted(keys, (torch.arange(m + 1) * n).expand(L, m + 1).contiguous())
    hi = rows.amax(1) * cols.amax(1) if m and n else torch.zeros(L, dtype=torch.float64)
    return rows, cols, keys.to(key_dtype), row_start, torch.tensor(need, dtype=torch.int64), hi


def truth(rows, cols, keys, row_start, need, hi, sections, rounds):
    """The contract in plain Python floats (IEEE doubles, one rounding per operation)."""
    L, m = rows.shape
    n = cols.shape[1]
    out = []
    for layer in range(L):
        R, C = rows[layer].tolist(), cols[layer].tolist()
        excluded = {int(k) for k in keys[layer].tolist() if k < m * n}

        def count(tau):
            total = 0
            for r in range(m):
                ratio = tau / R[r] if R[r] > 0 else math.inf
                p = sum(1 for q in range(n) if C[q] >= ratio)
                total += p - sum(1 for q in range(p) if r * n + q in excluded)
            return total

        lo, h = 0.0, float(hi[layer])
        for _ in range(rounds):
            mids = [lo + (h - lo) * ((s + 1) / (sections + 1)) for s in range(sections)]
            j = sum(1 for t in mids if count(t) >= int(need[layer]))
            bounds = [lo] + mids + [h]
            lo, h = bounds[j], bounds[j + 1]
        out.append(lo)
    return out


#: (L, m, n, sections, rounds, kind): the kernels' cases (CPU interpreter: small; GPU: larger ones are added)
CASES = [
    (1, 1, 1, 1, 3, None), (3, 7, 5, 3, 6, None), (5, 9, 13, 63, 2, None), (4, 12, 6, 7, 8, "ties"),
    (3, 10, 10, 15, 5, "zero_layer"), (2, 6, 9, 5, 0, None), (5, 11, 4, 2, 12, "dense"), (2, 0, 5, 3, 2, None),
    (2, 40, 33, 63, 3, None), (6, 17, 130, 9, 4, "ties"),
]
GPU_CASES = CASES + [(11, 4096, 1100, 63, 10, None), (3, 1100, 4096, 63, 10, "ties"), (70, 300, 257, 31, 12, None)]


def check_threshold(kernel, device, cases=CASES) -> int:
    """``kernel`` on ``device`` equal (bit for bit) to the reference backend on the CPU, both key dtypes."""
    from spiel.ops._dispatch import kernel_for

    reference = kernel_for("outer_threshold", "torch")
    checks = 0
    for case_no, (L, m, n, sections, rounds, kind) in enumerate(cases):
        for key_dtype in (torch.int32, torch.int64):
            g = torch.Generator().manual_seed(100 + case_no)
            args = make_case(L, m, n, g, key_dtype=key_dtype, kind=kind)
            want = reference(*args, sections, rounds)
            if device != "cpu":  # the memory the result will get, poisoned first
                poison = torch.full((1 << 16,), float("nan"), dtype=torch.float64, device=device)
                del poison
            got = kernel(*[a.to(device) for a in args], sections, rounds)
            label = f"case {case_no} {(L, m, n, sections, rounds, kind)} {key_dtype}"
            assert got.dtype == torch.float64 and got.shape == (L,), label
            assert torch.equal(got.cpu(), want), f"{label}: {got.cpu().tolist()} != {want.tolist()}"
            checks += 1
    return checks


@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}")
@pytest.mark.parametrize("key_dtype", [torch.int32, torch.int64])
def test_reference_matches_python_truth(case, key_dtype):
    L, m, n, sections, rounds, kind = case
    args = make_case(L, m, n, torch.Generator().manual_seed(L * 100 + m), key_dtype=key_dtype, kind=kind)
    got = ops.outer_threshold(*args, sections, rounds)
    assert got.tolist() == truth(*args, sections, rounds)


def test_threshold_keeps_the_top_cells():
    """After 60 bits every layer's top `need` non-excluded scores are at or above lo (so the caller's candidate
    set holds the answer), and lo is a reached bound: at most need + ties cells lie above it."""
    g = torch.Generator().manual_seed(7)
    rows, cols, keys, row_start, need, hi = make_case(4, 9, 8, g)
    need = torch.tensor([1, 5, 20, 40])
    lo = ops.outer_threshold(rows, cols, keys, row_start, need, hi, 7, 22)
    for layer in range(4):
        excluded = set(keys[layer].tolist())
        scores = sorted((rows[layer, r].item() * cols[layer, q].item() for r in range(9) for q in range(8)
                         if r * 8 + q not in excluded), reverse=True)
        if int(need[layer]) <= len(scores) and scores[int(need[layer]) - 1] > 0:
            assert scores[int(need[layer]) - 1] >= lo[layer].item() * (1 - 1e-12)


def test_opcheck():
    args = make_case(3, 7, 5, torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.spiel.outer_threshold, (*args, 5, 4))


def test_bad_input():
    rows, cols, keys, row_start, need, hi = make_case(2, 4, 3, torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match="rows"):
        ops.outer_threshold(rows.float(), cols, keys, row_start, need, hi, 3, 2)
    with pytest.raises(TypeError, match="keys"):
        ops.outer_threshold(rows, cols, keys.float(), row_start, need, hi, 3, 2)
    with pytest.raises(ValueError, match="row_start"):
        ops.outer_threshold(rows, cols, keys, row_start[:, :-1], need, hi, 3, 2)
    with pytest.raises(ValueError, match="need"):
        ops.outer_threshold(rows, cols, keys, row_start, need[:1], hi, 3, 2)
    with pytest.raises(ValueError, match="sections"):
        ops.outer_threshold(rows, cols, keys, row_start, need, hi, 64, 2)
    with pytest.raises(TypeError, match="rounds"):
        ops.outer_threshold(rows, cols, keys, row_start, need, hi, 3, 2.0)
    with pytest.raises(ValueError, match="descending"):
        ops.outer_threshold(rows, cols.flip(1), keys, row_start, need, hi, 3, 2)
    with pytest.raises(ValueError, match="ascending"):
        ops.outer_threshold(rows, cols, keys.flip(1), row_start, need, hi, 3, 2)


def _groups():
    from spiel.ops._dispatch import kernel_for

    tri = kernel_for("outer_threshold", "triton")
    return {"triton_matches_reference": lambda d: check_threshold(tri, d)}


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreted.interpreter_results(__file__, _groups)


def test_triton_interpreted(interpreter_results):
    res = interpreter_results["triton_matches_reference"]
    assert res["ok"], res["msg"]


if __name__ == "__main__":
    sys.exit(interpreted.child_main(_groups))
