"""The Triton forward kernels on the GPU at real sizes, bit-exact against the reference backend.

Same checks as tests/test_triton_forward.py (which runs them under the interpreter on tiny shapes): every
weight x values x index dtype, NF4 blocksizes 32..4096, double quantization on/off, odd shapes, k = 0, 1,
1 %, a third, all; in-place merge; the kernels' other tile orientation and tiny launch configs (many chunks,
multi-step searches); quantize edge values; a weight of more than 2**31 elements (64-bit offsets).
"""
import itertools
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import spiel.ops as ops  # noqa: E402
from tests.test_triton_forward import (  # noqa: E402
    BLOCKSIZES, INDEX_DTYPES, VALUE_DTYPES, WEIGHT_DTYPES, _assert_equal, _gen, _kernels, _ks,
    _randn, check_dequant, check_merge, check_quantize, group_public_ops, special_weights, triton_config,
)

DEV = "cuda"
ALL_BLOCKSIZES = sorted(set(BLOCKSIZES) | {256, 512, 1024, 2048})


@pytest.fixture(autouse=True)
def _triton_available():
    if not ops.backend_info()["triton"]["available"]:
        pytest.skip(ops.backend_info()["triton"]["reason"])


# ---- merge ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wd,vd,idt", list(itertools.product(WEIGHT_DTYPES, VALUE_DTYPES, INDEX_DTYPES)))
def test_merge_dtypes(wd, vd, idt):
    shape = (1024, 4096)
    check_merge(shape, wd, vd, idt, _ks(shape[0] * shape[1]), DEV)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 129), (257, 1000), (129, 8200), (4096, 4096),
                                   (11008, 4096), (4096, 11008)])
def test_merge_shapes(shape):
    n = shape[0] * shape[1]
    check_merge(shape, torch.bfloat16, torch.float32, torch.int32, _ks(n), DEV)
    check_merge(shape, torch.float32, torch.bfloat16, torch.int64, [1, max(1, n // 100)], DEV)


def test_merge_tiny_configs():
    with triton_config(merge={"block": 64, "num_warps": 1, "probes": 4, "patch_tile": 16, "inplace_block": 32}):
        check_merge((257, 1000), torch.float16, torch.float32, torch.int64, _ks(257000), DEV)
    with triton_config(merge={"block": 16384, "num_warps": 16, "patch_tile": 64}):
        check_merge((1000, 1000), torch.bfloat16, torch.bfloat16, torch.int32, _ks(10**6), DEV)


# ---- NF4 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2), (3, 6), (37, 130), (257, 1000), (4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("wd", WEIGHT_DTYPES)
def test_nf4_quantize(shape, wd):
    for bs in ALL_BLOCKSIZES:
        check_quantize(shape, bs, wd, DEV)


@pytest.mark.parametrize("wd", WEIGHT_DTYPES)
def test_nf4_quantize_edge_values(wd):
    for bs in (32, 64, 128):
        check_quantize(None, bs, wd, DEV, weight=special_weights(DEV).to(wd))


@pytest.mark.parametrize("od,vd,idt", list(itertools.product(WEIGHT_DTYPES, VALUE_DTYPES, INDEX_DTYPES)))
def test_nf4_dequant_dtypes(od, vd, idt):
    shape = (1024, 4096)
    check_dequant(shape, 64, idt == torch.int64, od, vd, idt, _ks(shape[0] * shape[1]), DEV)


@pytest.mark.parametrize("bs", ALL_BLOCKSIZES)
@pytest.mark.parametrize("dq", [False, True])
def test_nf4_dequant_blocksizes(bs, dq):
    for od in WEIGHT_DTYPES:
        check_dequant((4096, 4096), bs, dq, od, torch.float32, torch.int32, [0, 1, 4096 * 4096 // 100], DEV)


@pytest.mark.parametrize("shape", [(1, 2), (3, 6), (37, 130), (257, 1000), (129, 8200), (11008, 4096)])
def test_nf4_dequant_shapes(shape):
    n = shape[0] * shape[1]
    check_dequant(shape, 64, True, torch.bfloat16, torch.float32, torch.int32, _ks(n), DEV)
    check_dequant(shape, 128, False, torch.float16, torch.bfloat16, torch.int64, [0, 1, max(1, n // 3)], DEV)


def test_nf4_dequant_tiny_configs_and_other_layout():
    from spiel.ops.backends.triton import nf4 as tnf4

    with triton_config(nf4={"block": 64, "num_warps": 1, "probes": 4, "patch_tile": 16}):
        for bs, dq in itertools.product((32, 4096), (False, True)):
            check_dequant((257, 1000), bs, dq, torch.bfloat16, torch.bfloat16, torch.int64, _ks(257000), DEV)
    with triton_config(nf4={"block": 16384, "num_warps": 8}):
        check_dequant((1000, 1000), 64, True, torch.float32, torch.float32, torch.int32, _ks(10**6), DEV)
    tnf4._TRANSPOSED = not tnf4._TRANSPOSED  # the orientation the installed Triton does not use
    try:
        for bs, dq, od in [(32, True, torch.bfloat16), (64, False, torch.float32), (4096, True, torch.float16)]:
            check_dequant((1024, 4096), bs, dq, od, torch.float32, torch.int32, [0, 1, 41943], DEV)
    finally:
        tnf4._TRANSPOSED = not tnf4._TRANSPOSED


def test_public_ops_on_triton():
    group_public_ops(DEV)


# ---- more than 2**31 elements (64-bit offsets) ----------------------------------------------------------

def _big_indices(n, g):
    """~5000 random positions below 2**31 plus a run at the very end (offsets beyond 2**31), sorted unique."""
    head = torch.randint(0, 2**31, (5000,), device=DEV, generator=g)
    tail = torch.arange(n - 3000, n, 7, device=DEV)
    return torch.cat([head, tail]).unique()


def _big_shape_or_skip(bytes_needed):
    free, _ = torch.cuda.mem_get_info()
    if free < bytes_needed:
        pytest.skip(f"needs {bytes_needed / 2**30:.0f} GiB free GPU memory")
    return (32768, 65537)  # 2,147,516,416 elements > 2**31


@pytest.mark.slow
def test_merge_over_2g_elements():
    shape = _big_shape_or_skip(16 * 2**30)
    n = shape[0] * shape[1]
    ref, tri = _kernels("merge_delta")
    g = _gen(DEV, "big-merge")
    weight = torch.empty(shape, dtype=torch.bfloat16, device=DEV).normal_(generator=g)
    indices = _big_indices(n, g)
    values = _randn(indices.numel(), torch.float32, g, DEV)
    want = torch.empty_like(weight)
    ref(weight, indices, values, want)
    got = torch.full_like(weight, float("nan"))
    tri(weight, indices, values, got)
    _assert_equal(got, want, "merge > 2**31 elements")
    del got, want
    expect = weight.view(-1)[indices].float() + values
    tri(weight, indices, values, weight)
    _assert_equal(weight.view(-1)[indices], expect.to(torch.bfloat16), "merge > 2**31 elements in place")


@pytest.mark.slow
def test_nf4_dequant_over_2g_elements():
    from spiel.quant.nf4 import NF4_CODE

    shape = _big_shape_or_skip(12 * 2**30)
    n = shape[0] * shape[1]
    bs = 64
    _, tri = _kernels("nf4_dequantize_add_delta")
    g = _gen(DEV, "big-nf4")
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=DEV, generator=g)
    absmax = torch.rand((n + bs - 1) // bs, device=DEV, generator=g) + 0.5
    indices = _big_indices(n, g)
    values = _randn(indices.numel(), torch.float32, g, DEV)
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    tri(packed, absmax, None, None, 0.0, bs, indices, values, out)
    code = NF4_CODE.to(DEV)

    def expected(pos):  # fp32 product, one rounding
        byte = packed[pos // 2].long()
        q = torch.where(pos % 2 == 0, byte >> 4, byte & 15)
        return code[q] * absmax[pos // bs]

    window = torch.arange(n - 2**20, n, device=DEV)
    want = expected(window)
    at = torch.searchsorted(indices, window)
    hit = (at < indices.numel()) & (indices[at.clamp(max=indices.numel() - 1)] == window)
    want[hit] = want[hit] + values[at[hit]]
    _assert_equal(out.view(-1)[window], want.to(torch.bfloat16), "nf4 > 2**31 elements (tail window)")
    _assert_equal(out.view(-1)[indices], (expected(indices) + values).to(torch.bfloat16),
                  "nf4 > 2**31 elements (delta positions)")
    assert not out.isnan().any()


# ---- the swept launch knobs at real size (the defaults above are the tuned ones) --------------------------

@pytest.mark.parametrize("knobs", [
    dict(block=8192, num_warps=8, persistent=3, evict="evict_first", store=".cs"),
    dict(block=16384, num_warps=16, persistent=1, evict="", store=""),
    dict(block=4096, num_warps=4, persistent=0, evict="", store=".cs"),
])
def test_merge_knobs_real_size(knobs):
    with triton_config(merge=knobs):
        check_merge((11008, 4096), torch.bfloat16, torch.float32, torch.int32, [0, 1, 450888], DEV)
        check_merge((257, 1000), torch.float16, torch.bfloat16, torch.int64, _ks(257000), DEV)


@pytest.mark.parametrize("knobs", [
    dict(block=4096, num_warps=4, persistent=6, decode="pairs", group=4),
    dict(block=8192, num_warps=8, persistent=0, decode="table", group=8, evict="evict_first", store=".cs"),
])
def test_nf4_knobs_real_size(knobs):
    with triton_config(nf4=knobs):
        check_dequant((11008, 4096), 64, True, torch.bfloat16, torch.float32, torch.int32, [0, 450888], DEV)
        check_dequant((257, 1000), 128, False, torch.float16, torch.bfloat16, torch.int64, _ks(257000), DEV)
