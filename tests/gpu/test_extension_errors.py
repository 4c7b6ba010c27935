"""Bad input to the extension's private ops raises a RuntimeError with its message; it must never take the
process down. (Session 14 found checks whose message streamed an integer crashing the process with SIGSEGV in
the extension built on the device: messages now format numbers with snprintf, csrc/common.cuh msg_num.) Each
case runs in its own interpreter, so a crash fails that case instead of the test session."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRELUDE = """
import torch, spiel.ops
ops = torch.ops.spiel
c = lambda *shape, dtype=torch.float32: torch.ones(*shape, dtype=dtype, device="cuda")
"""

# (name, statement, a piece of the expected message)
CASES = [
    ("select_k_above_n", "ops._cuda_select_topk_abs(c(10), 11, None, 0)", "k must be in [0, 10], got 11"),
    ("drop_regrow_mixed_dtypes",
     "ops._cuda_drop_regrow_indices([c(4), c(4, dtype=torch.bfloat16)], [c(4, dtype=torch.int32)] * 2, "
     "c(2, 1, dtype=torch.int64))", "(row 1)"),
    ("drop_regrow_n_above_k",
     "ops._cuda_drop_regrow_indices([c(4)], [c(4, dtype=torch.int32)], c(1, 5, dtype=torch.int64))",
     "got n = 5, k = 4"),
    ("adamw_fractional_host_count",
     "ops._cuda_adamw_step_([c(4)], [c(4)], [c(4)], [c(4)], [], 0.1, 0.9, 0.99, 1e-8, 0.0, False, 0.5)", "got 0.5"),
    ("adamw_mismatched_numel",
     "ops._cuda_adamw_step_([c(4)], [c(5)], [c(4)], [c(4)], [], 0.1, 0.9, 0.99, 1e-8, 0.0, False, 1.0)",
     "grads[0] must have as many elements as params[0]"),
    ("nf4_odd_numel", "ops._cuda_nf4_quantize(c(7), 64)", "got 7"),
    ("index_put_many_dtype",
     "ops._cuda_index_put_many_([c(8), c(8, dtype=torch.float64)], [c(2, dtype=torch.int64)] * 2, [c(2), c(2)])",
     "(item 1)"),
    ("outer_threshold_sections",
     "ops._cuda_outer_threshold(c(2, 3, dtype=torch.float64), c(2, 4, dtype=torch.float64), "
     "c(2, 1, dtype=torch.int64), c(2, 4, dtype=torch.int64), c(2, dtype=torch.int64), c(2, dtype=torch.float64), "
     "64, 3)", "got 64"),
]


@pytest.mark.parametrize("name,statement,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(name, statement, expected):
    code = PRELUDE + f"""
if not hasattr(ops, "_cuda_merge_delta"):
    print("NOT BUILT")
else:
    try:
        {statement}
    except RuntimeError as exc:
        print("RAISED", str(exc).splitlines()[0])
    else:
        print("NO ERROR")
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    if "NOT BUILT" in proc.stdout:
        pytest.skip("spiel._C is not built")
    assert proc.returncode == 0, f"{name}: the process died (rc {proc.returncode}): {proc.stderr[-1500:]}"
    assert "RAISED" in proc.stdout, f"{name}: no error raised: {proc.stdout}"
    assert expected in proc.stdout, f"{name}: unexpected message: {proc.stdout}"
