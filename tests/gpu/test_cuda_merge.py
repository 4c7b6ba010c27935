"""The CUDA forward kernels of csrc/merge.cu (torch.ops.spiel._cuda_*) against torch computations.

Every expected value is computed with the contract's arithmetic (fp32 products / sums, one rounding) in
plain torch, so the comparisons are bit-exact; a float64 computation bounds them within one rounding.
Inputs are fresh random (never zeros) and outputs are poisoned with NaN before each call.
"""
import itertools

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
try:
    import spiel._C  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"spiel._C is not built: {exc}", allow_module_level=True)

from spiel.quant.nf4 import NF4_CODE, dynamic_code, quantize_reference  # noqa: E402

DEV = "cuda"
WEIGHT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
SHAPES = [(1, 1), (3, 5), (37, 129), (257, 1000)]
NF4_SHAPES = [(1, 2), (3, 10), (37, 130), (257, 1000), (129, 8200)]  # even numel; last: partial last chunk
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
OPS = torch.ops.spiel


def _gen(*key) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(hash(key) % 2**31)


def _indices(n: int, k: int, dtype, g) -> torch.Tensor:
    """k sorted unique flat positions out of n."""
    return torch.randperm(n, generator=g, device=DEV)[:k].sort().values.to(dtype)


def _values(k: int, dtype, g) -> torch.Tensor:
    v = torch.randn(k, generator=g, device=DEV)
    return torch.where(v == 0, torch.ones_like(v), v).to(dtype)


def _ks(n: int):
    return sorted({0, 1, max(1, n // 100), max(1, n // 3), n})


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = ""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bad = ~((got == want) | (got.isnan() & want.isnan()))
    if bad.any():
        i = int(bad.view(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, first at flat {i}: "
                             f"got {got.view(-1)[i].item()!r}, want {want.view(-1)[i].item()!r}")


# ---- merge_delta ---------------------------------------------------------------------------------------

def _merge_want(weight, indices, values):
    fp32 = weight.float().reshape(-1).clone()
    fp32[indices.long()] += values.float()
    want = weight.reshape(-1).clone()
    want[indices.long()] = fp32[indices.long()].to(weight.dtype)
    return want.view(weight.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdtype,vdtype,idtype", list(itertools.product(WEIGHT_DTYPES, VALUE_DTYPES, INDEX_DTYPES)))
def test_merge_delta(shape, wdtype, vdtype, idtype):
    g = _gen("merge", shape, str(wdtype), str(vdtype), str(idtype))
    n = shape[0] * shape[1]
    for k in _ks(n):
        weight = torch.randn(shape, generator=g, device=DEV).to(wdtype)
        indices = _indices(n, k, idtype, g)
        values = _values(k, vdtype, g)
        want = _merge_want(weight, indices, values)
        out = _poisoned(shape, wdtype)
        OPS._cuda_merge_delta(weight, indices, values, out)
        _assert_bitwise(out, want, f"merge k={k}")
        # within one rounding of the float64 sum
        exact = weight.double().reshape(-1).clone()
        exact[indices.long()] += values.double()
        tol = torch.finfo(wdtype).eps * exact.abs().clamp(min=1)
        assert ((out.double().reshape(-1) - exact).abs() <= tol).all()
        # in place: out is weight
        before = weight.clone()
        OPS._cuda_merge_delta(weight, indices, values, weight)
        _assert_bitwise(weight, _merge_want(before, indices, values), f"in-place merge k={k}")


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("idtype", INDEX_DTYPES)
def test_merge_delta_large_and_clustered(wdtype, idtype):
    """Many chunks, a partial last chunk, deltas clustered on chunk boundaries, first/last element."""
    g = _gen("merge-large", str(wdtype), str(idtype))
    shape = (1031, 4099)
    n = shape[0] * shape[1]
    weight = torch.randn(shape, generator=g, device=DEV).to(wdtype)
    chunk = 256 * 4 * (16 // weight.element_size())
    edges = torch.arange(0, n + chunk, chunk, device=DEV)
    clustered = (edges[:, None] + torch.arange(-3, 3, device=DEV)[None, :]).reshape(-1)
    clustered = clustered[(clustered >= 0) & (clustered < n)]
    cases = {
        "1%": _indices(n, n // 100, torch.int64, g),
        "clustered": torch.unique(torch.cat([clustered, torch.tensor([0, n - 1], device=DEV)])),
        "first": torch.tensor([0], device=DEV),
        "last": torch.tensor([n - 1], device=DEV),
        "50%": _indices(n, n // 2, torch.int64, g),
        "one-chunk-full": torch.arange(chunk, 2 * chunk, device=DEV),
    }
    for name, idx in cases.items():
        idx = idx.to(idtype)
        values = _values(idx.numel(), torch.float32, g)
        out = _poisoned(shape, wdtype)
        OPS._cuda_merge_delta(weight, idx, values, out)
        _assert_bitwise(out, _merge_want(weight, idx, values), f"merge {name}")


def test_merge_delta_misaligned_and_stream():
    """Views at an odd element offset take the scalar path; the kernel runs on the current stream."""
    g = _gen("merge-misaligned")
    n = 37 * 129
    for wdtype in WEIGHT_DTYPES:
        buf = torch.randn(n + 1, generator=g, device=DEV).to(wdtype)
        weight = buf[1:].view(37, 129)
        assert weight.data_ptr() % 16 != 0
        obuf = torch.full((n + 1,), float("nan"), dtype=wdtype, device=DEV)
        out = obuf[1:].view(37, 129)
        idx = _indices(n, n // 7, torch.int32, g)
        values = _values(idx.numel(), torch.bfloat16, g)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            OPS._cuda_merge_delta(weight, idx, values, out)
        torch.cuda.current_stream().wait_stream(s)
        _assert_bitwise(out, _merge_want(weight, idx, values), f"misaligned {wdtype}")
        assert obuf[0].isnan()


# ---- NF4 dequantize + delta -----------------------------------------------------------------------------

def _nf4_inputs(n: int, blocksize: int, double_quant: bool, g):
    nblocks = (n + blocksize - 1) // blocksize
    packed = torch.randint(0, 256, (n // 2,), generator=g, device=DEV, dtype=torch.uint8)
    if double_quant:
        absmax = torch.randint(0, 256, (nblocks,), generator=g, device=DEV, dtype=torch.uint8)
        nested_absmax = torch.rand((nblocks + 255) // 256, generator=g, device=DEV) + 0.5
        nested_code = dynamic_code().to(DEV)
        nested_offset = float(torch.rand((), generator=g, device=DEV)) + 0.25
        return packed, absmax, nested_absmax, nested_code, nested_offset
    absmax = torch.rand(nblocks, generator=g, device=DEV) * 3 + 0.1
    return packed, absmax, None, None, 0.0


def _absmax_fp32(absmax, nested_absmax, nested_code, nested_offset):
    if absmax.dtype != torch.uint8:
        return absmax
    scale = nested_absmax.repeat_interleave(256)[: absmax.numel()]
    prod = nested_code[absmax.long()] * scale  # fp32 product, then fp32 add: two roundings
    return prod + torch.tensor(nested_offset, dtype=torch.float32, device=DEV)


def _nf4_want(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, indices, values, dtype,
              acc=torch.float32):
    """fp32 code * absmax, then + delta in ``acc`` (fp32 per the contract), one rounding to ``dtype``."""
    n = packed.numel() * 2
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1).long()
    scale = _absmax_fp32(absmax, nested_absmax, nested_code, nested_offset).repeat_interleave(blocksize)[:n]
    dense = (NF4_CODE.to(DEV)[codes] * scale).to(acc)
    dense[indices.long()] += values.to(acc)
    return dense.to(dtype)


def _run_nf4(args, blocksize, indices, values, dtype, out=None):
    n = args[0].numel() * 2
    if out is None:
        out = _poisoned((n,), dtype)
    OPS._cuda_nf4_dequantize_add_delta(*args, blocksize, indices, values, out)
    return out


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("odtype,vdtype,idtype", list(itertools.product(WEIGHT_DTYPES, VALUE_DTYPES, INDEX_DTYPES)))
def test_nf4_dequantize_add_delta_dtypes(odtype, vdtype, idtype, double_quant):
    g = _gen("nf4-dtypes", str(odtype), str(vdtype), str(idtype), double_quant)
    for shape in [(37, 130), (257, 1000)]:
        n = shape[0] * shape[1]
        for k in _ks(n):
            args = _nf4_inputs(n, 64, double_quant, g)
            indices = _indices(n, k, idtype, g)
            values = _values(k, vdtype, g)
            got = _run_nf4(args, 64, indices, values, odtype)
            _assert_bitwise(got, _nf4_want(*args, 64, indices, values, odtype), f"nf4 {shape} k={k}")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_dequantize_add_delta_blocksizes(shape, blocksize, double_quant):
    g = _gen("nf4-bs", shape, blocksize, double_quant)
    n = shape[0] * shape[1]
    for i, k in enumerate(_ks(n)):
        idtype = INDEX_DTYPES[i % 2]
        odtype = WEIGHT_DTYPES[i % 3]
        args = _nf4_inputs(n, blocksize, double_quant, g)
        indices = _indices(n, k, idtype, g)
        values = _values(k, torch.float32, g)
        got = _run_nf4(args, blocksize, indices, values, odtype)
        want = _nf4_want(*args, blocksize, indices, values, odtype)
        _assert_bitwise(got, want, f"nf4 bs={blocksize} k={k}")
        # float64 bound: the fp32 product + delta is within one rounding of out dtype + fp32 error
        exact = _nf4_want(*args, blocksize, indices, values, torch.float64, acc=torch.float64)
        tol = (torch.finfo(odtype).eps + 2 * torch.finfo(torch.float32).eps) * exact.abs().clamp(min=1e-3)
        assert ((got.double() - exact).abs() <= tol).all()


def test_nf4_dequantize_large_clustered_and_misaligned():
    g = _gen("nf4-large")
    n = 1031 * 4100
    args = _nf4_inputs(n, 64, True, g)
    chunk = 8192
    edges = torch.arange(0, n + chunk, chunk, device=DEV)
    clustered = (edges[:, None] + torch.arange(-3, 3, device=DEV)[None, :]).reshape(-1)
    clustered = torch.unique(clustered[(clustered >= 0) & (clustered < n)])
    for idx in (_indices(n, n // 100, torch.int32, g), clustered, torch.arange(n, device=DEV)):
        values = _values(idx.numel(), torch.float16, g)
        got = _run_nf4(args, 64, idx, values, torch.bfloat16)
        _assert_bitwise(got, _nf4_want(*args, 64, idx, values, torch.bfloat16), "nf4 large")
    # packed and out at odd offsets: scalar path
    n = 37 * 130
    packed, absmax, na, nc, off = _nf4_inputs(n, 32, False, g)
    pbuf = torch.empty(n // 2 + 1, dtype=torch.uint8, device=DEV)
    pbuf[1:] = packed
    obuf = torch.full((n + 1,), float("nan"), dtype=torch.float16, device=DEV)
    idx = _indices(n, 100, torch.int64, g)
    values = _values(100, torch.float32, g)
    OPS._cuda_nf4_dequantize_add_delta(pbuf[1:], absmax, na, nc, off, 32, idx, values, obuf[1:])
    _assert_bitwise(obuf[1:], _nf4_want(packed, absmax, na, nc, off, 32, idx, values, torch.float16), "misaligned")
    assert obuf[0].isnan()


def test_nf4_dequantize_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    g = _gen("nf4-bnb")
    for blocksize, nested, dtype in itertools.product([64, 128, 4096], [False, True], WEIGHT_DTYPES):
        w = torch.randn(300, 514, generator=g, device=DEV).to(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
        theirs = bnbf.dequantize_4bit(packed, state).reshape(-1)
        if nested:
            args = (packed.view(-1), state.absmax, state.state2.absmax, state.state2.code, float(state.offset))
        else:
            args = (packed.view(-1), state.absmax, None, None, 0.0)
        empty = torch.empty(0, dtype=torch.int32, device=DEV)
        got = _run_nf4(args, blocksize, empty, empty.float(), dtype)
        _assert_bitwise(got, theirs, f"vs bitsandbytes bs={blocksize} nested={nested} {dtype}")


# ---- NF4 quantize ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
def test_nf4_quantize(wdtype, blocksize):
    g = _gen("nf4-quant", str(wdtype), blocksize)
    for shape in NF4_SHAPES:
        w = (torch.randn(shape, generator=g, device=DEV) * 0.05).to(wdtype)
        packed, absmax = OPS._cuda_nf4_quantize(w, blocksize)
        want_packed, want_absmax = quantize_reference(w, blocksize)
        _assert_bitwise(absmax, want_absmax, f"absmax {shape}")
        _assert_bitwise(packed, want_packed, f"packed {shape}")
        # round trip: dequantized within half the largest code gap of each block's absmax
        n = w.numel()
        empty = torch.empty(0, dtype=torch.int64, device=DEV)
        deq = _run_nf4((packed, absmax, None, None, 0.0), blocksize, empty, empty.float(), torch.float32)
        gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2
        bound = absmax.repeat_interleave(blocksize)[:n] * gap * (1 + 1e-5)
        assert ((deq - w.float().reshape(-1)).abs() <= bound).all()


def test_nf4_quantize_ties_zero_blocks_and_misaligned():
    code = NF4_CODE.to(DEV)
    mids = (code[:-1] + code[1:]) / 2  # fp32 midpoints: exactly on a midpoint goes to the lower code
    below = torch.nextafter(mids, torch.full_like(mids, -2))
    above = torch.nextafter(mids, torch.full_like(mids, 2))
    block = torch.cat([torch.tensor([1.0], device=DEV), mids, below, above, code,
                       torch.zeros(64 - 1 - 15 * 3 - 16 + 32, device=DEV)])[:64]
    w = torch.cat([block, torch.zeros(64, device=DEV), -block]).view(3, 64)  # a zero block -> code 7
    packed, absmax = OPS._cuda_nf4_quantize(w, 64)
    want_packed, want_absmax = quantize_reference(w, 64)
    _assert_bitwise(absmax, want_absmax, "tie absmax")
    _assert_bitwise(packed, want_packed, "tie packed")
    assert absmax[1].item() == 0 and (packed[32:64] == 0x77).all()
    q = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1).long()
    assert torch.equal(q[1:16], torch.arange(0, 15, device=DEV))  # midpoint m -> code m (the lower)
    # misaligned input view
    buf = torch.randn(37 * 130 + 1, device=DEV).to(torch.bfloat16)
    packed, absmax = OPS._cuda_nf4_quantize(buf[1:], 128)
    want_packed, want_absmax = quantize_reference(buf[1:], 128)
    _assert_bitwise(packed, want_packed, "misaligned packed")
    _assert_bitwise(absmax, want_absmax, "misaligned absmax")


def test_nf4_quantize_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    g = _gen("nf4-quant-bnb")
    for blocksize, dtype in itertools.product([64, 256, 4096], WEIGHT_DTYPES):
        w = torch.randn(300, 514, generator=g, device=DEV).to(dtype)
        theirs, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        packed, absmax = OPS._cuda_nf4_quantize(w, blocksize)
        _assert_bitwise(absmax, state.absmax.float(), f"bnb absmax bs={blocksize}")
        # bitsandbytes' decimal thresholds may differ from the fp32 midpoints in the last ulp: allow a
        # vanishing number of one-step differences
        q = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1).int()
        tq = torch.stack([theirs.view(-1) >> 4, theirs.view(-1) & 0xF], 1).reshape(-1).int()
        diff = (q - tq).abs()
        assert diff.max() <= 1 and int((diff != 0).sum()) <= max(1, q.numel() // 100000)


# ---- registration with the dispatch --------------------------------------------------------------------

def test_cuda_backend_registered_and_used():
    import spiel.ops as ops
    from spiel.ops import _dispatch
    from spiel.ops.backends import cuda as cuda_backend

    assert cuda_backend.AVAILABLE, cuda_backend.REASON
    info = ops.backend_info()["cuda"]
    assert info["available"]
    for name in ("merge_delta", "nf4_dequantize_add_delta", "nf4_quantize"):
        assert _dispatch.kernel_for(name, "cuda") is not None, name
    g = _gen("dispatch")
    w = torch.randn(37, 129, generator=g, device=DEV).to(torch.bfloat16)
    idx = _indices(w.numel(), 300, torch.int32, g)
    val = _values(300, torch.float32, g)
    with ops.use_backend("cuda"):
        got = ops.merge_delta(w, idx, val)
    _assert_bitwise(got, _merge_want(w, idx, val), "dispatch merge")
    with ops.use_backend("cuda"):
        nf4 = ops.nf4_quantize(w.float().view(37, 129)[:, :128].contiguous(), blocksize=64, double_quant=True)
        got = ops.nf4_dequantize_add_delta(nf4, idx[idx < nf4.numel()], val[idx < nf4.numel()])
    with ops.use_backend("torch"):
        nf4_ref = ops.nf4_quantize(w.float().view(37, 129)[:, :128].contiguous(), blocksize=64, double_quant=True)
        want = ops.nf4_dequantize_add_delta(nf4_ref, idx[idx < nf4.numel()], val[idx < nf4.numel()])
    _assert_bitwise(got, want, "dispatch nf4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_index_put_and_select_many(dtype, index_dtype):
    """The CUDA list kernels against the reference backend: 130 tensors (three launches of <= 64), odd sizes,
    empty index lists, a weight-sized tensor; outputs poisoned first; the weights bit-equal after the puts."""
    import spiel.ops as ops

    g = _gen("many", str(dtype), str(index_dtype))
    shapes = [(3, 5), (37, 129), (1, 1), (5, 7), (257, 1000)] * 26
    dense = [torch.randn(s, device=DEV, generator=g).to(dtype) for s in shapes]
    ks = [min(s[0] * s[1], (11 * j) % 5000) for j, s in enumerate(shapes)]
    idxs = [_indices(s[0] * s[1], k, index_dtype, g) for s, k in zip(shapes, ks)]
    vals = [torch.randn(k, device=DEV, generator=g).to(dtype) for k in ks]
    twins = [d.clone() for d in dense]
    with ops.use_backend("cuda"):
        ops.index_put_many_(dense, idxs, vals)
    with ops.use_backend("torch"):
        ops.index_put_many_(twins, idxs, vals)
    for d, t in zip(dense, twins):
        assert torch.equal(d, t)
    outs = [torch.full((k,), float("nan"), device=DEV).to(dtype) for k in ks]
    with ops.use_backend("cuda"):
        ops.index_select_many(dense, idxs, outs)
    for o, d, i in zip(outs, dense, idxs):
        assert torch.equal(o, d.view(-1)[i.long()])
