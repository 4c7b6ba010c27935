"""``spiel.ops.select_topk_abs`` on the GPU: the CUDA radix select against the exact oracle of
tests/test_select_op.py (identical positions and magnitudes, ties and excluded positions included) at odd and
real probe sizes, and the AG probe on the CUDA and reference backends (identical answers)."""
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spiel.ops as ops  # noqa: E402
from spiel.ops._dispatch import kernel_for  # noqa: E402
from test_select_op import check_select, oracle  # noqa: E402

DEV = "cuda"


def _cuda():
    if not ops.backend_info()["cuda"]["available"] or kernel_for("select_topk_abs", "cuda") is None:
        pytest.skip("the CUDA backend (spiel._C with select_topk_abs) is unavailable")
    return kernel_for("select_topk_abs", "cuda")


def test_small_and_odd():
    assert check_select(_cuda(), DEV, sizes=(1, 7, 1000, 4099, (1 << 16) + 3, 300_001)) > 300


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096)])
def test_probe_sizes(shape):
    """A real |gradient| block (bf16 GEMM, fp32 out) with the 7B probe's exclusion (LoRA-r64 density 2.14%) and
    regrow count (20% of it); also bf16 input, a tiny k and k = n - len(exclude)."""
    kernel = _cuda()
    g = torch.Generator(device=DEV).manual_seed(0)
    out_f, in_f = shape
    n = out_f * in_f
    go = torch.randn(2048, out_f, device=DEV, dtype=torch.bfloat16, generator=g)
    x = torch.randn(2048, in_f, device=DEV, dtype=torch.bfloat16, generator=g)
    grad = torch.mm(go.t(), x, out_dtype=torch.float32).view(-1)
    active = torch.randperm(n, device=DEV, generator=g)[: int(n * 0.0214)].sort().values
    k = int(active.numel() * 0.2)
    for values, exclude, kk in ((grad, active.int(), k), (grad, active, 1), (grad.bfloat16(), active.int(), k),
                                (grad, active.int(), n - active.numel()), (grad, None, k)):
        got = kernel(values, kk, exclude, 0)
        want = oracle(values, kk, exclude, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (values.dtype, kk)
        again = kernel(values, kk, exclude, 0)
        assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])  # deterministic


def test_massive_ties_near_the_block_limit():
    """2**26 entries in four magnitudes: the threshold bin holds tens of millions of ties."""
    kernel = _cuda()
    g = torch.Generator(device=DEV).manual_seed(1)
    n = (1 << 26) - 5
    values = torch.randint(0, 4, (n,), device=DEV, generator=g).float()
    exclude = torch.randperm(n, device=DEV, generator=g)[: n // 10].sort().values
    for k in (1000, n // 3, n - exclude.numel() + 7):  # the last returns 7 excluded entries at -inf
        got = kernel(values, k, exclude, 0)
        want = oracle(values, k, exclude, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k


@pytest.mark.parametrize("block_elements", [1 << 26, 1 << 22])
def test_probe_backends_agree(block_elements):
    """top_gradient_entries: the CUDA select and the reference give the same candidates (one block per layer,
    and row blocks with shifted exclusion)."""
    _cuda()
    from spiel.scheduler._select import top_gradient_entries

    g = torch.Generator(device=DEV).manual_seed(2)
    go = torch.randn(512, 11008, device=DEV, dtype=torch.bfloat16, generator=g)
    x = torch.randn(512, 4096, device=DEV, dtype=torch.bfloat16, generator=g)
    exclude = torch.randperm(11008 * 4096, device=DEV, generator=g)[:964_000].sort().values.int()
    with ops.use_backend("torch"):
        want = top_gradient_entries(go, x, exclude, 192_979, block_elements)
    with ops.use_backend("cuda"):
        got = top_gradient_entries(go, x, exclude, 192_979, block_elements)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_probe_bf16_blocks_rank_like_fp32():
    """bf16 activations: the probe ranks the bf16-rounded gradient (half the bytes); its candidates are the fp32
    gradient's top-k except near the threshold, where entries within one bf16 step of each other may swap."""
    _cuda()
    from spiel.scheduler._select import top_gradient_entries

    g = torch.Generator(device=DEV).manual_seed(5)
    go = torch.randn(256, 3000, device=DEV, dtype=torch.bfloat16, generator=g)
    x = torch.randn(256, 1111, device=DEV, dtype=torch.bfloat16, generator=g)
    exclude = torch.randperm(3000 * 1111, device=DEV, generator=g)[:80_000].sort().values
    k = 50_000
    pos, score = top_gradient_entries(go, x, exclude, k)
    dense = torch.mm(go.float().t(), x.float()).view(-1).abs()
    dense[exclude] = -1.0
    truth = torch.topk(dense, k).indices.sort().values
    assert pos.numel() == k and bool((pos[1:] > pos[:-1]).all())
    assert not bool(torch.isin(pos, exclude).any())
    overlap = torch.isin(pos, truth).float().mean().item()
    threshold = dense[truth].min()
    # every chosen entry is within a bf16 rounding step (2**-8 relative) of the fp32 threshold or above it
    assert bool((dense[pos] >= threshold * (1 - 2.0 ** -7)).all())
    assert overlap > 0.97, overlap  # ~1.4k of 3.3M entries lie within a rounding step of the threshold
    torch.testing.assert_close(score, dense[pos].bfloat16().float(), rtol=2.0 ** -7, atol=0)


def test_16bit_paired_and_unaligned_loads():
    """16-bit x: the count and write passes load two entries per lane when x starts on a 4-byte boundary, one
    otherwise (a view 2 bytes in); both exact, at odd lengths and with ties, zeros and exclusions."""
    kernel = _cuda()
    g = torch.Generator(device=DEV).manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        base = torch.randn(300_007, device=DEV, generator=g).to(dtype)
        base[::7] = 0  # many equal keys (key 1) and ties at the threshold
        base[5::11] = base[3::11][: base[5::11].numel()]
        exclude = torch.randperm(300_000, device=DEV, generator=g)[:20_000].sort().values
        for offset in (0, 1, 2, 3):
            x = base[offset:]
            for k in (1, 777, 100_000, x.numel() - 19_000):
                got = kernel(x, k, exclude, 0)
                want = oracle(x, k, exclude, 0)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, offset, k)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_heavy_tails_and_exclusions(dtype):
    """Normal and heavy-tailed values (one half scaled down 1e3, every 97th entry of the other up 1e3), zeros,
    dense exclusions (2%) at every k from 1 to past the non-excluded count: the oracle's answer. 16-bit x takes
    the one-level 32768-bin histogram, fp32 the three levels; x of 1M entries spans many warp ranges and segments."""
    kernel = _cuda()
    g = torch.Generator(device=DEV).manual_seed(7)
    n = 1_000_003
    smooth = torch.randn(n, device=DEV, generator=g)
    skewed = smooth.clone()
    skewed[: n // 2] *= 1e-3
    skewed[n // 2:: 97] *= 1e3
    exclude = torch.randperm(n, device=DEV, generator=g)[: n // 50].sort().values
    for base in (smooth, skewed):
        x = base.to(dtype)
        x[::1013] = 0
        for k in (1, 5_000, 200_001, n - exclude.numel() + 3):
            for excl in (exclude, None):
                got = kernel(x, k, excl, 0)
                want = oracle(x, k, excl, 0)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, k)
