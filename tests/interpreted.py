"""Groups of Triton checks run under Triton's CPU interpreter, shared by the test modules that need it.

``TRITON_INTERPRET=1`` must be set before triton is imported, and conftest.py imports spiel (hence triton)
first, so a module's groups run in ONE child process (the module run as a script, ``child_main``) that prints
one result per group; the module-scoped fixture built with ``interpreter_results`` parses them and each group
is one pytest test. Under ``TRITON_INTERPRET=1`` without a GPU the groups run in-process instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "INTERPRETER_RESULTS "

Groups = Dict[str, Callable[[str], int]]  # group name -> check(device) returning its number of checks


def run_groups(groups: Groups, device: str = "cpu") -> dict:
    results = {}
    for name, fn in groups.items():
        t0 = time.time()
        try:
            n = fn(device)
            results[name] = {"ok": True, "msg": f"{n} checks in {time.time() - t0:.1f}s"}
        except Exception:
            results[name] = {"ok": False, "msg": traceback.format_exc()[-3000:]}
    return results


def child_main(groups: Callable[[], Groups]) -> int:
    """The child process: run every group on the CPU and print the results on one marked line."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(MARKER + json.dumps(run_groups(groups())))
    return 0


def interpreter_results(module_file: str, groups: Callable[[], Groups], timeout: int = 1800) -> dict:
    """Results of ``groups`` under the interpreter: in-process when already interpreting on a CPU-only
    machine, else from one child process running ``module_file``."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        return run_groups(groups())
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, os.path.abspath(module_file)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise AssertionError(f"interpreter child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
