"""The delta gradient on CUDA tensors: Triton and CUDA kernels, every strategy forced in turn, against
float64; determinism (two runs bit-identical); the public op through each backend.

Shapes cover: odd feature sizes (non-vectorizable paths), several 2048 x 2048 superblocks, superblocks
split into several sparse work items (> 8192 entries), long T with few entries (T splits + the fixed-order
reduce), concentrated masks (compaction), k = 0 and k = out * in, unsorted cat(indices, candidates).
"""
import pytest
import torch

from tests.test_sddmm import CASES, DTYPES, INDEX_DTYPES, assert_close_fp32, check_kernel, exact, gen, \
    make_indices, randn

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import spiel.ops as ops  # noqa: E402
from spiel.ops.backends import sddmm_plan as P  # noqa: E402

DEV = "cuda"
GPU_CASES = CASES + [
    (512, 1024, 1536, 15728, "random"),       # ~1%, vectorized paths
    (2048, 2100, 4200, 8820, "layer"),        # 0.1%, 2 x 3 superblocks, odd sizes (scalar staging)
    (1024, 2048, 2048, 25000, "random"),      # one superblock, 4 work items
    (4096, 512, 520, 300, "random"),          # few entries, long T: many T splits
    (256, 1000, 1200, 12000, "concentrated"),  # compaction
    (64, 1000, 1200, 0, "random"),
    (33, 250, 136, 250 * 136, "random"),      # k = out * in
]
STRATS = ("sparse", "dense_tile", "dense_blas")


def _cuda_available():
    return ops.backend_info()["cuda"]["available"] and hasattr(torch.ops.spiel, "_cuda_sddmm")


def _triton_kernel(strategy, gather=None):
    from spiel.ops.backends.triton import sddmm as TS

    def fn(G, X, idx, o, i, plan):
        if gather is not None:
            TS._GATHER_OK["value"] = gather
        return TS.sddmm(G, X, idx, o, i, plan, strategy=strategy)
    return fn


def _cuda_kernel(strategy):
    def fn(G, X, idx, o, i, plan):
        return P.cuda_sddmm(G, X, idx, o, i, plan, strategy=strategy)
    return fn


@pytest.mark.parametrize("strategy", STRATS)
def test_triton_strategies(strategy):
    check_kernel(_triton_kernel(strategy), DEV, cases=GPU_CASES, determinism=True)


def test_triton_tile_scratch_epilogue():
    check_kernel(_triton_kernel("dense_tile", gather=False), DEV, cases=GPU_CASES,
                 pairs=[(torch.bfloat16, torch.int32), (torch.float16, torch.int64)], determinism=True)
    from spiel.ops.backends.triton import sddmm as TS
    TS._GATHER_OK["value"] = True


def test_triton_tile_direct_no_compaction():
    check_kernel(_triton_kernel("dense_tile"), DEV, cases=GPU_CASES, plan_kw={"compaction": False},
                 pairs=[(torch.bfloat16, torch.int64)], determinism=True)


@pytest.mark.parametrize("strategy", STRATS)
def test_cuda_strategies(strategy):
    if not _cuda_available():
        pytest.skip("spiel._C (with _cuda_sddmm) is not built")
    check_kernel(_cuda_kernel(strategy), DEV, cases=GPU_CASES, determinism=True)


def test_cuda_tile_direct_no_compaction_and_no_plan():
    if not _cuda_available():
        pytest.skip("spiel._C (with _cuda_sddmm) is not built")
    check_kernel(_cuda_kernel("dense_tile"), DEV, cases=GPU_CASES, plan_kw={"compaction": False},
                 pairs=[(torch.bfloat16, torch.int64)], determinism=True)
    check_kernel(lambda G, X, idx, o, i, plan: torch.ops.spiel._cuda_sddmm(G, X, idx, o, i, None), DEV,
                 cases=GPU_CASES, pairs=[(torch.float16, torch.int32)], determinism=True)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_op_each_backend(backend):
    if backend == "cuda" and not _cuda_available():
        pytest.skip("spiel._C is not built")
    for (T, o, i, k, kind) in GPU_CASES[-5:]:
        for dtype in DTYPES:
            g = gen(DEV, "pub", backend, T, o, i, k, kind, dtype)
            G, X = randn((T, o), dtype, g, DEV), randn((T, i), dtype, g, DEV)
            idx = make_indices(o, i, k, kind, torch.int32, g, DEV)
            plan = ops.sddmm_plan(idx, o, i)
            with ops.use_backend(backend):
                got = ops.sddmm(G, X, idx, o, i, plan=plan)
                again = ops.sddmm(G, X, idx, o, i, plan=plan)
            want, scale = exact(G, X, idx, i)
            assert_close_fp32(got, want, scale, T, f"{backend} {T} {o}x{i} {kind} {dtype}")
            assert torch.equal(got, again)


def test_plan_on_gpu_matches_cpu():
    g = gen("cpu", "plan-gpu")
    idx = make_indices(2100, 4200, 30000, "layer", torch.int64, g, "cpu")
    a = P.build_plan(idx, 2100, 4200)
    b = P.build_plan(idx.to(DEV), 2100, 4200)
    assert torch.equal(a, b.cpu())


BAND_CASES = [  # several 64 MiB fp32 bands: column bands (in > out) and row bands (out > in)
    (16, 300, 70000, 6000, "random"),
    (16, 70000, 300, 6000, "random"),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dense_blas_bands(backend):
    """dense_blas over more than one band, both orientations (sddmm_plan.bands), against float64."""
    assert len(P.bands(300, 70000)) == 2 and P.bands(300, 70000)[0][1] == 300
    assert len(P.bands(70000, 300)) == 2 and P.bands(70000, 300)[0][3] == 300
    if backend == "cuda" and not _cuda_available():
        pytest.skip("spiel._C not built")
    kernel = _triton_kernel("dense_blas") if backend == "triton" else _cuda_kernel("dense_blas")
    check_kernel(kernel, DEV, cases=BAND_CASES, pairs=[(torch.bfloat16, torch.int32), (torch.float32, torch.int64)])


def test_batched_plan_build_equals_single_builds_cuda():
    """``sddmm_plan.build_plans`` on CUDA tensors (batched sorts and scatters, one read-back) gives the plans of
    the single-plan build it replaced, element for element, balanced or not."""
    from tests.plan_reference import build_plan_reference
    from tests.test_sddmm_plan_batched import CASES as PLAN_CASES

    items = [(idx.to(DEV), o, i) for _, o, i, idx in PLAN_CASES]
    g = torch.Generator(device=DEV).manual_seed(3)
    for o, i, d in ((4096, 4096, 0.001), (1100, 4096, 0.001), (4096, 1100, 0.01)):
        for _ in range(3):  # batched layers of one shape and k
            items.append((torch.randperm(o * i, device=DEV, generator=g)[: int(o * i * d)].sort().values.int(), o, i))
    for balance in (False, True):
        got = P.build_plans(items, balance=balance)
        for (idx, o, i), plan in zip(items, got):
            assert plan.device.type == "cuda"
            assert torch.equal(plan, build_plan_reference(idx, o, i, balance=balance)), (o, i, idx.numel())


# ---- the sm90a wgmma dense_tile kernel (csrc/sddmm_sm90.cuh) ------------------------------------------------
WGMMA_CASES = [
    (200, 1152, 4096, 47186, "random"),     # 144 tiles > 132 SMs: the last 12 run as T halves (atomic adds)
    (64, 4096, 2048, 83886, "random"),      # 256 tiles, one k-block each: two units per CTA, bitmap buffers reused
    (96, 1024, 1024, 104858, "random"),     # 10%: > 1024 entries per half tile (output positions past the cache)
    (300, 640, 776, 4966, "concentrated"),  # few tiles: T splits (part buffer + reduce), compaction
    (1, 512, 520, 2000, "random"),          # one token
]


def _wgmma_on():
    import spiel._C as C
    return _cuda_available() and C.sddmm_wgmma_available(torch.cuda.current_device())


def test_wgmma_available_where_built():
    """An extension built for 9.0a on a compute capability 9.0 GPU runs the wgmma kernel (not silently WMMA)."""
    if not _cuda_available():
        pytest.skip("spiel._C is not built")
    import spiel._C as C
    expect = C.built_sm90a and torch.cuda.get_device_capability() == (9, 0)
    assert C.sddmm_wgmma_available(torch.cuda.current_device()) == expect
    assert P.cuda_wgmma(torch.device("cuda")) == expect


def test_wgmma_dense_tile():
    if not _wgmma_on():
        pytest.skip("needs an H100/H200 and spiel._C built for 9.0a")
    pairs = [(torch.bfloat16, torch.int32), (torch.float16, torch.int64)]
    check_kernel(_cuda_kernel("dense_tile"), DEV, cases=WGMMA_CASES, pairs=pairs, determinism=True)
    check_kernel(_cuda_kernel("dense_tile"), DEV, cases=WGMMA_CASES[:2], plan_kw={"compaction": False},
                 pairs=[(torch.bfloat16, torch.int64)], determinism=True)


def test_wgmma_large_flat_indices_and_skipped_tiles():
    """out * in > 2**32 (64-bit division in the bitmap build) with almost every tile empty (skipped units), and
    an operand view 2 bytes off 16-byte alignment (falls back to the WMMA kernel)."""
    if not _wgmma_on():
        pytest.skip("needs an H100/H200 and spiel._C built for 9.0a")
    T, o, i, k = 40, 70000, 66000, 3000
    g = gen(DEV, "wgmma-large")
    idx = torch.unique(torch.randint(0, o * i, (k,), device=DEV, generator=g)).long()
    G, X = randn((T, o), torch.bfloat16, g, DEV), randn((T, i), torch.bfloat16, g, DEV)
    want, scale = exact(G, X, idx, i)
    plan = P.build_plan(idx, o, i, compaction=False)
    got = P.cuda_sddmm(G, X, idx, o, i, plan, strategy="dense_tile")
    assert_close_fp32(got, want, scale, T, "70000x66000 dense_tile")
    off = torch.empty(T * i + 1, dtype=torch.bfloat16, device=DEV)[1:].view(T, i).copy_(X)  # 2 bytes off
    want, scale = exact(G, off, idx, i)
    got = P.cuda_sddmm(G, off, idx, o, i, plan, strategy="dense_tile")
    assert_close_fp32(got, want, scale, T, "unaligned input")


# ---- row plans: the wgmma kernel on sorted indices without a full plan ----------------------------------------
ROW_CASES = [c for c in WGMMA_CASES if c[4] == "random"] + [
    (300, 640, 776, 4966, "random"),   # few tiles: T splits, partial sums in list order
    (33, 250, 136, 2000, "random"),    # odd feature count: cuBLAS bands
]


def test_row_plan_cuda_and_triton():
    """A row plan (sorted indices) runs the wgmma kernel where it applies (cuBLAS bands elsewhere, and for fp32
    inputs) and is ignored by the Triton backend: every result against float64, deterministic."""
    if not _cuda_available():
        pytest.skip("spiel._C is not built")
    from spiel.ops.backends.triton import sddmm as TS

    def cuda_row(G, X, idx, o, i, plan):
        return torch.ops.spiel._cuda_sddmm(G, X, idx, o, i, P.build_row_plan(idx, o, i))

    def triton_row(G, X, idx, o, i, plan):
        return TS.sddmm(G, X, idx, o, i, P.build_row_plan(idx, o, i))

    pairs = [(torch.bfloat16, torch.int32), (torch.float16, torch.int64), (torch.float32, torch.int32)]
    check_kernel(cuda_row, DEV, cases=ROW_CASES, pairs=pairs, determinism=True)
    check_kernel(triton_row, DEV, cases=ROW_CASES[-2:], pairs=pairs[:1])


def test_row_plan_layer_on_h100():
    """rebuild_sddmm_plans gives a LoRA-density layer a row plan on an H100 (none while candidates are set), and
    its gradients match the plan-free ones."""
    if not _wgmma_on():
        pytest.skip("needs an H100/H200 and spiel._C built for 9.0a")
    from spiel.nn import SparseDeltaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(512, 1024, bias=False).to(DEV, torch.bfloat16)
    layer = SparseDeltaLinear.from_linear(base, num_deltas=int(0.03 * 512 * 1024))
    with torch.no_grad():
        layer.values.normal_()
    assert P.is_row_plan(layer.sddmm_plan, 1024)
    x = torch.randn(3, 100, 512, device=DEV, dtype=torch.bfloat16)
    layer(x).float().square().sum().backward()
    got = layer.values.grad.clone()
    layer.values.grad = None
    layer.sddmm_plan = None
    layer(x).float().square().sum().backward()
    torch.testing.assert_close(got, layer.values.grad, rtol=1e-2, atol=1e-2)
