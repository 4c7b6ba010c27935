"""The Triton radix-select ``block_top`` (the AG probe's per-block exact top-k) against the reference
``spiel.scheduler._select._block_top``: identical positions (ties by position) on random, heavily tied,
mostly-zero, excluded (-inf), denormal and huge inputs, block sizes that are not multiples of the program
chunk, k from 1 to every non-excluded entry; and the probe ``top_gradient_entries`` giving the same answer on
both backends. Runs under Triton's interpreter in one child process (``TRITON_INTERPRET=1`` must be set before
triton is imported); ``check_block_top`` is reused at real sizes by tests/gpu/test_select_gpu.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(n, kind, g, device):
    x = torch.rand(n, generator=g).to(device)
    if kind == "ties":
        x = (x * 7).floor()
    elif kind == "zeros":
        x = torch.where(torch.rand(n, generator=g).to(device) < 0.9, torch.zeros_like(x), x)
    elif kind == "tiny":  # denormals and tiny normals: the key's low digits decide
        x = x * 1e-39
    elif kind == "huge":
        x = x * 3e38
    elif kind == "excluded":
        x[torch.randperm(n, generator=g)[: n // 3].to(device)] = float("-inf")
    return x


def check_block_top(kernel, device, sizes=(1, 5, 300, 4099), kinds=("rand", "ties", "zeros", "tiny", "huge",
                                                                    "excluded")) -> int:
    from spiel.scheduler._select import _block_top

    g = torch.Generator().manual_seed(3)
    checks = 0
    for n in sizes:
        for kind in kinds:
            x = _inputs(n, kind, g, device)
            free = int((x >= 0).sum())
            for k in sorted({0, 1, min(free, 2), free // 3, free // 2, free}):
                got = kernel(x, k)
                want = _block_top(x, k)
                assert got.dtype == torch.int64 and torch.equal(got.cpu(), want.cpu()), (n, kind, k)
                checks += 1
    return checks


def check_probe_backends(device) -> int:
    """top_gradient_entries on the triton and torch backends: same positions and scores."""
    import spiel.ops as ops
    from spiel.scheduler._select import top_gradient_entries

    g = torch.Generator().manual_seed(5)
    checks = 0
    for out_f, in_f, T, block in ((37, 29, 6, 1 << 26), (64, 48, 3, 700)):
        go = torch.randn(T, out_f, generator=g).to(device)
        x = torch.randn(T, in_f, generator=g).to(device)
        exclude = torch.randperm(out_f * in_f, generator=g)[: out_f * in_f // 7].sort().values.to(device)
        for k in (1, 50, out_f * in_f - exclude.numel()):
            with ops.use_backend("torch"):
                want = top_gradient_entries(go, x, exclude, k, block)
            with ops.use_backend("triton"):
                got = top_gradient_entries(go, x, exclude, k, block)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (out_f, in_f, k)
            checks += 1
    return checks


@contextlib.contextmanager
def small_programs():
    from spiel.ops.backends.triton import select

    saved = dict(select._CONFIG_OVERRIDE)
    select._CONFIG_OVERRIDE.update(chunk=256, block=64)  # many programs and loop iterations on small blocks
    try:
        yield
    finally:
        select._CONFIG_OVERRIDE.clear()
        select._CONFIG_OVERRIDE.update(saved)


def _groups():
    from spiel.ops._dispatch import kernel_for
    import spiel.scheduler  # noqa: F401  (registers the reference)

    def small(fn):
        def run(device):
            with small_programs():
                return fn(device)
        return run

    tri = kernel_for("block_top", "triton")
    return {
        "triton_block_top": small(lambda d: check_block_top(tri, d)),
        "triton_block_top_default_chunk": lambda d: check_block_top(tri, d, sizes=(70001,), kinds=("rand", "ties")),
        "triton_probe_backends": small(check_probe_backends),
    }


def _child_main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, fn in _groups().items():
        t0 = time.time()
        try:
            n = fn("cpu")
            results[name] = {"ok": True, "msg": f"{n} checks in {time.time() - t0:.1f}s"}
        except Exception:
            results[name] = {"ok": False, "msg": traceback.format_exc()[-3000:]}
    print("SELECT_RESULTS " + json.dumps(results))
    return 0


@pytest.fixture(scope="module")
def interpreter_results():
    try:
        import triton  # noqa: F401
    except Exception:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("SELECT_RESULTS "):
            return json.loads(line[len("SELECT_RESULTS "):])
    raise AssertionError(f"interpreter child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("group", ["triton_block_top", "triton_block_top_default_chunk", "triton_probe_backends"])
def test_triton_interpreted(interpreter_results, group):
    res = interpreter_results[group]
    assert res["ok"], res["msg"]


def test_reference_dispatch_on_cpu():
    """On CPU tensors the probe's block_top is the reference, whatever Triton is doing."""
    import spiel.ops as ops
    import spiel.scheduler  # noqa: F401

    assert ops._dispatch.select("block_top", torch.device("cpu"))[0] == "torch"


if __name__ == "__main__":
    sys.exit(_child_main())
