"""The Triton forward kernels (merge_delta, nf4_dequantize_add_delta, nf4_quantize) against the reference.

They run on the CPU through Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
triton is imported -- and conftest.py imports spiel (hence triton) first. So the checks run in ONE child
process (``python tests/test_triton_forward.py``, started once per pytest session by a module fixture) that
reports one result per group; each group is one pytest test. If pytest itself already runs under
``TRITON_INTERPRET=1`` without a GPU, the groups run in-process.

Every comparison is bit-exact (``torch.equal``; outputs are poisoned with NaN before each call), on fresh
random inputs (never zeros). The ``check_*`` functions take a device and are reused at real sizes by
tests/gpu/test_triton_forward_gpu.py.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WEIGHT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
BLOCKSIZES = [32, 64, 128, 4096]


# ---- helpers --------------------------------------------------------------------------------------------

def _kernels(name):
    from spiel.ops._dispatch import kernel_for

    return kernel_for(name, "torch"), kernel_for(name, "triton")


def _gen(device, *key) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash(tuple(str(k) for k in key)) % 2**31)


def _randn(shape, dtype, g, device):
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    return torch.where(x == 0, torch.ones_like(x), x)  # never zeros (also after rounding)


def _indices(n, k, dtype, g, device):
    return torch.randperm(n, generator=g, device=device)[:k].sort().values.to(dtype)


def _ks(n):
    return sorted({0, 1, max(1, n // 100), max(1, n // 3), n})


def _poison(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _assert_equal(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    if not torch.equal(got, want):
        bad = (got != want).reshape(-1)
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, first at flat {i}: "
                             f"got {got.reshape(-1)[i].item()!r}, want {want.reshape(-1)[i].item()!r}")


@contextlib.contextmanager
def triton_config(merge=None, nf4=None):
    """Override the kernels' launch configuration (e.g. tiny chunks: many chunk boundaries on small tensors)."""
    from spiel.ops.backends.triton import merge as tmerge, nf4 as tnf4

    saved = dict(tmerge._CONFIG_OVERRIDE), dict(tnf4._CONFIG_OVERRIDE)
    tmerge._CONFIG_OVERRIDE.update(merge or {})
    tnf4._CONFIG_OVERRIDE.update(nf4 or {})
    try:
        yield
    finally:
        tmerge._CONFIG_OVERRIDE.clear()
        tmerge._CONFIG_OVERRIDE.update(saved[0])
        tnf4._CONFIG_OVERRIDE.clear()
        tnf4._CONFIG_OVERRIDE.update(saved[1])


# ---- merge_delta ----------------------------------------------------------------------------------------

def check_merge(shape, wdtype, vdtype, idtype, ks, device, inplace=True):
    ref, tri = _kernels("merge_delta")
    n = shape[0] * shape[1]
    g = _gen(device, "merge", shape, wdtype, vdtype, idtype)
    for k in ks:
        what = f"merge {shape} w={wdtype} v={vdtype} idx={idtype} k={k}"
        weight = _randn(shape, wdtype, g, device)
        indices = _indices(n, k, idtype, g, device)
        values = _randn(k, vdtype, g, device)
        want = _poison(shape, wdtype, device)
        ref(weight, indices, values, want)
        got = _poison(shape, wdtype, device)
        before = weight.clone()
        tri(weight, indices, values, got)
        _assert_equal(got, want, what)
        _assert_equal(weight, before, what + " (weight modified)")
        if inplace:
            tri(weight, indices, values, weight)
            _assert_equal(weight, want, what + " in place")


# ---- NF4 ------------------------------------------------------------------------------------------------

def _quantized(shape, wdtype, blocksize, double_quant, g, device):
    from spiel.quant.nf4 import _double_quantize, quantize_reference

    weight = _randn(shape, wdtype, g, device)
    packed, absmax = quantize_reference(weight, blocksize)
    if double_quant:
        q, nested_absmax, code, offset = _double_quantize(absmax)
        return (packed, q, nested_absmax, code, offset, blocksize)
    return (packed, absmax, None, None, 0.0, blocksize)


def check_dequant(shape, blocksize, double_quant, odtype, vdtype, idtype, ks, device):
    ref, tri = _kernels("nf4_dequantize_add_delta")
    n = shape[0] * shape[1]
    g = _gen(device, "nf4", shape, blocksize, double_quant, odtype, vdtype, idtype)
    args = _quantized(shape, torch.float32, blocksize, double_quant, g, device)
    for k in ks:
        what = f"nf4 dequant {shape} bs={blocksize} dq={double_quant} out={odtype} v={vdtype} idx={idtype} k={k}"
        indices = _indices(n, k, idtype, g, device)
        values = _randn(k, vdtype, g, device)
        want = _poison(shape, odtype, device)
        ref(*args, indices, values, want)
        got = _poison(shape, odtype, device)
        tri(*args, indices, values, got)
        _assert_equal(got, want, what)


def check_quantize(shape, blocksize, wdtype, device, weight=None):
    ref, tri = _kernels("nf4_quantize")
    g = _gen(device, "quant", shape, blocksize, wdtype)
    if weight is None:
        weight = _randn(shape, wdtype, g, device)
    what = f"nf4 quantize {tuple(weight.shape)} bs={blocksize} w={weight.dtype}"
    want_packed, want_absmax = ref(weight, blocksize)
    got_packed, got_absmax = tri(weight, blocksize)
    _assert_equal(got_absmax, want_absmax, what + " absmax")
    _assert_equal(got_packed, want_packed, what + " packed")


def special_weights(device):
    """Weights that hit the rounding edges of quantize: values exactly on the midpoints between NF4 codes
    (must go to the lower code), the codes themselves, all-zero blocks (absmax 0), subnormal blocks."""
    from spiel.quant.nf4 import NF4_CODE

    code = NF4_CODE.to(device)
    mids = (code[:-1] + code[1:]) / 2
    row = torch.cat([mids, code, -mids, torch.ones(1, device=device)])  # absmax 1 -> scaled == w
    row = torch.cat([row, torch.zeros(64 - row.numel(), device=device)])
    scale = torch.tensor([1.0, 0.5, 2.0**-20, 0.0], device=device)  # powers of two keep scaled exact
    blocks = (row[None, :] * scale[:, None])
    tiny = torch.randn(64, device=device) * 1e-39  # subnormal fp32 (and bf16)
    w = torch.cat([blocks.reshape(-1), tiny]).reshape(-1, 64)
    return w


# ---- the groups the CPU (interpreter) run executes --------------------------------------------------------

def group_merge_dtypes(device):
    # every weight x values x index dtype; small chunks so the tensor spans many programs
    with triton_config(merge={"block": 256, "num_warps": 2}):
        for wd, vd, idt in itertools.product(WEIGHT_DTYPES, VALUE_DTYPES, INDEX_DTYPES):
            check_merge((37, 129), wd, vd, idt, [40, 1500], device)


def group_merge_shapes(device):
    for shape in [(1, 1), (3, 5), (37, 129), (257, 1000)]:
        n = shape[0] * shape[1]
        ks = _ks(n) if n < 10000 else [0, 1, n // 100, n // 3]
        check_merge(shape, torch.bfloat16, torch.float32, torch.int32, ks, device)
        check_merge(shape, torch.float32, torch.bfloat16, torch.int64, [0, 1, max(1, n // 3)], device)


def group_merge_search(device):
    # tiny chunks, few probes per search step and a short patch tile: multi-step searches, multi-step patch
    # loops, deltas at chunk edges, dense-ish and full index sets
    with triton_config(merge={"block": 64, "num_warps": 1, "probes": 8, "patch_tile": 16, "inplace_block": 32}):
        shape = (13, 129)
        n = shape[0] * shape[1]
        check_merge(shape, torch.float16, torch.float32, torch.int64, [1, n // 100, n // 3, n - 1, n], device)
        ref, tri = _kernels("merge_delta")
        weight = _randn(shape, torch.bfloat16, _gen(device, "edges"), device)
        edges = torch.tensor(sorted({0, 63, 64, 127, 128, 1023, 1024, n - 1}), dtype=torch.int32, device=device)
        values = _randn(edges.numel(), torch.float32, _gen(device, "edges-v"), device)
        want = _poison(weight.shape, weight.dtype, device)
        ref(weight, edges, values, want)
        got = _poison(weight.shape, weight.dtype, device)
        tri(weight, edges, values, got)
        _assert_equal(got, want, "merge chunk edges")


# Non-default launch knobs (the --tune sweep's axes) on tiny chunks: persistent programs walking many chunks
# (under the interpreter the SM count is 3), cache hints, windows shorter than a chunk's deltas.
MERGE_KNOBS = [
    {"block": 64, "num_warps": 1, "persistent": 1, "patch_tile": 16, "probes": 8},
    {"block": 128, "num_warps": 2, "persistent": 2, "evict": "evict_first", "store": ".cs"},
    {"block": 64, "num_warps": 2, "evict": "evict_first", "store": ".cs", "patch_tile": 8},
]
NF4_KNOBS = [
    {"block": 64, "num_warps": 1, "persistent": 1, "patch_tile": 16, "probes": 8},
    {"block": 128, "num_warps": 2, "persistent": 2, "decode": "pairs", "evict": "evict_first", "store": ".cs"},
    {"block": 128, "num_warps": 2, "decode": "pairs", "group": 8, "patch_tile": 16},
]


def group_merge_knobs(device):
    ref, tri = _kernels("merge_delta")
    for knobs in MERGE_KNOBS:
        with triton_config(merge=knobs):
            shape = (13, 129)
            n = shape[0] * shape[1]
            check_merge(shape, torch.bfloat16, torch.float32, torch.int32, [0, 1, n // 100, n // 3, n], device,
                        inplace=False)
            check_merge((37, 129), torch.float32, torch.bfloat16, torch.int64, [40, 1500], device, inplace=False)
            weight = _randn(shape, torch.float16, _gen(device, "knob-edges"), device)
            edges = torch.tensor(sorted({0, 63, 64, 127, 128, 1023, 1024, n - 2, n - 1}), dtype=torch.int32,
                                 device=device)
            values = _randn(edges.numel(), torch.float32, _gen(device, "knob-edges-v"), device)
            want = _poison(shape, weight.dtype, device)
            ref(weight, edges, values, want)
            got = _poison(shape, weight.dtype, device)
            tri(weight, edges, values, got)
            _assert_equal(got, want, f"merge chunk edges {knobs}")


def group_nf4_dequant_knobs(device):
    for knobs in NF4_KNOBS:
        with triton_config(nf4=knobs):
            for bs, dq, od in [(32, True, torch.bfloat16), (64, False, torch.float32), (4096, True, torch.float16)]:
                check_dequant((13, 130), bs, dq, od, torch.float32, torch.int32, [0, 1, 17, 563, 1690], device)
            check_dequant((37, 130), 64, True, torch.bfloat16, torch.bfloat16, torch.int64, [481, 4810], device)


def group_nf4_quantize(device):
    for shape, bs, wd in itertools.product([(1, 2), (3, 6), (37, 130), (64, 300)], BLOCKSIZES, WEIGHT_DTYPES):
        check_quantize(shape, bs, wd, device)
    for wd in WEIGHT_DTYPES:
        for bs in (32, 64, 128):
            check_quantize(None, bs, wd, device, weight=special_weights(device).to(wd))
    with triton_config(nf4={"quant_elements": 32}):  # one block per program
        check_quantize((37, 130), 64, torch.bfloat16, device)


def group_nf4_dequant_dtypes(device):
    for od, vd, idt in itertools.product(WEIGHT_DTYPES, VALUE_DTYPES, INDEX_DTYPES):
        check_dequant((20, 64), 64, idt == torch.int64, od, vd, idt, [1, 300], device)


def group_nf4_dequant_blocksizes(device):
    for bs, dq, od in itertools.product(BLOCKSIZES, (False, True), WEIGHT_DTYPES):
        check_dequant((37, 130), bs, dq, od, torch.float32, torch.int32, [0, 1, 481, 4810], device)


def group_nf4_dequant_shapes(device):
    # tiny chunks (many programs, multi-step searches and patch loops), dense-ish and full index sets
    with triton_config(nf4={"block": 64, "num_warps": 1, "probes": 8, "patch_tile": 16}):
        for bs, dq in itertools.product((32, 4096), (False, True)):
            check_dequant((13, 130), bs, dq, torch.bfloat16, torch.bfloat16, torch.int64, [17, 1690], device)
        check_dequant((13, 130), 64, True, torch.float16, torch.float32, torch.int32, [1, 563, 1689], device)
    for shape in [(1, 2), (3, 6), (257, 1000)]:
        n = shape[0] * shape[1]
        ks = _ks(n) if n < 10000 else [0, 1, n // 100, n // 3]
        check_dequant(shape, 64, True, torch.bfloat16, torch.float32, torch.int32, ks, device)
        check_dequant(shape, 128, False, torch.float16, torch.float16, torch.int64, [0, 1, max(1, n // 3)], device)


def group_nf4_dequant_other_layout(device):
    # the kernel has two tile orientations, chosen by Triton version (3.6: transposed): run the other one too
    from spiel.ops.backends.triton import nf4 as tnf4

    tnf4._TRANSPOSED = not tnf4._TRANSPOSED
    try:
        for bs, dq, od in [(32, True, torch.bfloat16), (64, False, torch.float32), (4096, True, torch.float16)]:
            check_dequant((37, 130), bs, dq, od, torch.float32, torch.int32, [0, 481, 4810], device)
    finally:
        tnf4._TRANSPOSED = not tnf4._TRANSPOSED


def group_public_ops(device):
    """The public ops with the triton backend selected (dispatch through torch.library)."""
    import spiel.ops as ops

    g = _gen(device, "public")
    weight = _randn((37, 129), torch.bfloat16, g, device)
    indices = _indices(weight.numel(), 200, torch.int32, g, device)
    values = _randn(200, torch.float32, g, device)
    w8 = _randn((40, 64), torch.bfloat16, g, device)
    with ops.use_backend("torch"):
        want = ops.merge_delta(weight, indices, values)
        nf4_want = ops.nf4_quantize(w8, 64, double_quant=True)
        idx8 = indices[indices < w8.numel()]
        val8 = values[: idx8.numel()]
        deq_want = ops.nf4_dequantize_add_delta(nf4_want, idx8, val8)
    with ops.use_backend("triton"):
        _assert_equal(ops.merge_delta(weight, indices, values), want, "public merge_delta")
        out = _poison(weight.shape, weight.dtype, device)
        ops.merge_delta(weight, indices, values, out=out)
        _assert_equal(out, want, "public merge_delta out=")
        w2 = weight.clone()
        ops.merge_delta(w2, indices, values, out=w2)
        _assert_equal(w2, want, "public merge_delta in place")
        nf4 = ops.nf4_quantize(w8, 64, double_quant=True)
        for a, b in zip(nf4.op_args()[:4], nf4_want.op_args()[:4]):
            _assert_equal(a, b, "public nf4_quantize")
        _assert_equal(ops.nf4_dequantize_add_delta(nf4, idx8, val8), deq_want, "public nf4_dequantize_add_delta")
        _assert_equal(ops.nf4_dequantize(nf4), nf4_want.dequantize(), "public nf4_dequantize")


GROUPS = {name[len("group_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("group_")}


def run_groups(names, device="cpu") -> dict:
    results = {}
    for name in names:
        t0 = time.time()
        try:
            GROUPS[name](device)
            results[name] = {"ok": True, "seconds": round(time.time() - t0, 2)}
        except Exception:
            results[name] = {"ok": False, "seconds": round(time.time() - t0, 2), "error": traceback.format_exc()}
    return results


# ---- pytest side ------------------------------------------------------------------------------------------

def _in_process() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not torch.cuda.is_available()


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    if _in_process():
        return None
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_triton_forward_interpreted(group, interpreter_results):
    if interpreter_results is None:
        result = run_groups([group])[group]
    else:
        result = interpreter_results[group]
    assert result["ok"], result.get("error")


if __name__ == "__main__":
    # child process: TRITON_INTERPRET=1 is set by the parent (or by hand); run the named groups (default: all)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or sorted(GROUPS)
    results = run_groups(names)
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        for name, r in results.items():
            print(f"{name:28s} {'ok' if r['ok'] else 'FAIL'} {r['seconds']:7.2f}s")
            if not r["ok"]:
                print(r["error"])
        sys.exit(0 if all(r["ok"] for r in results.values()) else 1)
