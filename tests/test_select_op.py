"""``spiel.ops.select_topk_abs``: the k largest |x| as an ascending set, excluded positions ranked last.

The truth is an independent oracle: one sort of a composite int64 key (fp32 magnitude bits, 0 for an excluded
position; then the position, smaller first), so ties, NaN (= 0), +-inf, -0.0 and the demotion of excluded
positions are all checked exactly. ``check_select`` is shared with the GPU tests (tests/gpu/test_select_gpu.py)
and the compute-sanitizer driver.
"""
import pytest
import torch

import spiel.ops as ops
from spiel.ops._dispatch import kernel_for

KINDS = ("randn", "ties", "special", "excluded", "offset")
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def oracle(x: torch.Tensor, k: int, exclude, offset: int):
    """(ascending positions, magnitudes) by a full sort of a composite key: exact and independent of the ops."""
    n = x.numel()
    mag = torch.nan_to_num(x.float().abs(), nan=0.0, posinf=float("inf"))
    key = mag.view(torch.int32).to(torch.int64) + 1
    if exclude is not None and exclude.numel():
        local = exclude.to(torch.int64) - offset
        key[local[(local >= 0) & (local < n)]] = 0
    position = torch.arange(n, device=x.device)
    composite = key * (1 << 31) + ((1 << 31) - 1 - position)
    chosen = torch.sort(torch.sort(composite, descending=True).indices[:k]).values
    magnitudes = torch.where(key[chosen] == 0, torch.full_like(mag[chosen], float("-inf")), mag[chosen])
    return chosen, magnitudes


def make_case(n: int, kind: str, dtype, index_dtype, g: torch.Generator, device):
    """(x, exclude, offset) of one kind; fresh random values every call."""
    if kind == "ties":  # few distinct magnitudes, both signs, many zeros: ties at the threshold
        x = (torch.randint(-3, 4, (n,), generator=g) * 0.5).to(dtype)
    elif kind == "special":
        x = torch.randn(n, generator=g).to(dtype)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -float("nan")])
        at = torch.randint(0, n, (max(1, n // 5),), generator=g)
        x[at] = specials[torch.randint(0, len(specials), (at.numel(),), generator=g)].to(dtype)
    else:
        x = torch.randn(n, generator=g).to(dtype)
    offset = 0
    exclude = None
    if kind in ("excluded", "offset", "ties"):
        if kind == "offset":  # a slice of a larger array: exclude spans positions before, in and after x
            offset = int(torch.randint(1, 3 * n + 2, (1,), generator=g))
            universe = offset + n + 2 * n + 5
        else:
            universe = n
        share = 0.5 if kind == "excluded" else 0.3
        count = int(universe * share)
        exclude = torch.randperm(universe, generator=g)[:count].sort().values.to(index_dtype)
    return x.to(device), (None if exclude is None else exclude.to(device)), offset


def _poison(device, k: int) -> None:
    """Free poisoned blocks of the outputs' sizes: the caching allocator hands them to the op's outputs next, so
    an entry the op forgets to write shows up (CPU allocations are fresh: nothing to do)."""
    if torch.device(device).type == "cuda":
        junk = (torch.full((k,), -7, dtype=torch.int64, device=device),
                torch.full((k,), float("nan"), device=device))
        del junk


def check_select(kernel, device, sizes, kinds=KINDS, dtypes=FLOATS, index_dtypes=(torch.int32, torch.int64),
                 seed: int = 0, k_values=None) -> int:
    """Compare ``kernel(x, k, exclude, offset)`` with the oracle at several k per case; returns the check count."""
    g = torch.Generator().manual_seed(seed)
    checks = 0
    for n in sizes:
        for kind in kinds:
            for dtype in dtypes:
                for index_dtype in index_dtypes if kind in ("excluded", "offset", "ties") else index_dtypes[:1]:
                    x, exclude, offset = make_case(n, kind, dtype, index_dtype, g, device)
                    inside = 0 if exclude is None else int(((exclude.long() >= offset)
                                                             & (exclude.long() < offset + n)).sum())
                    ks = {0, 1, n, max(0, n - inside), int(torch.randint(0, n + 1, (1,), generator=g)),
                          min(n, max(1, n // 200))} if k_values is None else set(k_values)
                    for k in sorted(ks):
                        _poison(device, k)
                        positions, magnitudes = kernel(x, k, exclude, offset)
                        want_pos, want_mag = oracle(x, k, exclude, offset)
                        where = f"n={n} kind={kind} dtype={dtype} index={index_dtype} k={k} offset={offset}"
                        assert positions.dtype == torch.int64 and magnitudes.dtype == torch.float32, where
                        assert positions.shape == (k,) and magnitudes.shape == (k,), where
                        assert torch.equal(positions, want_pos), where
                        assert torch.equal(magnitudes, want_mag), where
                        checks += 1
    return checks


def test_reference_against_oracle():
    assert check_select(kernel_for("select_topk_abs", "torch"), "cpu", sizes=(1, 7, 1000, 4099)) > 100


def test_reference_chunked_schedule():
    # above 2**25 entries the reference takes its chunked two-stage top-k: same answer
    n = (1 << 25) + 16 * 3
    check_select(kernel_for("select_topk_abs", "torch"), "cpu", sizes=(n,), kinds=("randn",),
                 dtypes=(torch.float32,), index_dtypes=(torch.int32,), k_values=(n // 200,))


def test_public_op_and_errors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, generator=g)
    exclude = torch.randperm(300, generator=g)[:100].sort().values
    positions, magnitudes = ops.select_topk_abs(x, 20, exclude)
    want = oracle(x, 20, exclude, 0)
    assert torch.equal(positions, want[0]) and torch.equal(magnitudes, want[1])
    assert torch.equal(x, torch.randn(300, generator=torch.Generator().manual_seed(1)))  # x is not modified
    with pytest.raises(ValueError, match="x must be 1-D"):
        ops.select_topk_abs(x.view(30, 10), 3)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.select_topk_abs(torch.arange(5), 3)
    with pytest.raises(ValueError, match="k must be in"):
        ops.select_topk_abs(x, 301)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.select_topk_abs(x, True)
    with pytest.raises(TypeError, match="exclude must have dtype"):
        ops.select_topk_abs(x, 3, exclude.float())
    with pytest.raises(ValueError, match="sorted and unique"):
        ops.select_topk_abs(x, 3, exclude.flip(0))
    with pytest.raises(ValueError, match="non-negative"):
        ops.select_topk_abs(x, 3, exclude - 5)
    with pytest.raises(ValueError, match="exclude_offset"):
        ops.select_topk_abs(x, 3, exclude, -1)
    with pytest.raises(TypeError, match="exclude_offset"):
        ops.select_topk_abs(x, 3, exclude, 1.0)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(257, generator=g)
    exclude = torch.randperm(400, generator=g)[:90].sort().values.int()
    torch.library.opcheck(torch.ops.spiel.select_topk_abs, (x, 17, exclude, 100))
    torch.library.opcheck(torch.ops.spiel.select_topk_abs, (x.bfloat16(), 0, None, 0))


def test_compiles():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, generator=g)

    @torch.compile(backend="eager", fullgraph=True)
    def top(x):
        return ops.select_topk_abs(x * 2, 9)

    positions, magnitudes = top(x)
    want = oracle(x * 2, 9, None, 0)
    assert torch.equal(positions, want[0]) and torch.equal(magnitudes, want[1])
