"""``spiel.ops.adamw_step_`` (fused AdamW with per-slot step counts): every backend against float64.

Truth is the same math in float64 (the reference kernel on float64 copies). Each kernel's error is bounded
by a few times the error the plain fp32 reference makes on the same inputs plus half an ulp of the output
dtype (its rounding): "tolerances scaled to the error low-precision PyTorch already makes". Step counts must
match exactly, which also proves every element was updated exactly once. Tensors are views at odd offsets
inside guard buffers filled with NaN: a write outside a tensor shows up in the guards. Inputs are fresh and
random (never zeros); counts include 0, small values and the saturation point.

The Triton kernel runs on the CPU through Triton's interpreter in one child process (``TRITON_INTERPRET=1``
must be set before triton is imported); the ``check_adamw`` function is reused at real sizes on the GPU by
tests/gpu/test_adamw_gpu.py.
"""
from __future__ import annotations

import sys

import pytest
import torch

import interpreted


PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]
STEP_DTYPES = [torch.int16, torch.int32, torch.float32]
HYPER = [dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False),
         dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, maximize=True),
         dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)]
GUARD = 3


def _guarded(n, dtype, device):
    """A contiguous view of n elements at offset GUARD inside a NaN (or -1) filled buffer, and the buffer."""
    fill = float("nan") if dtype.is_floating_point else -1
    buf = torch.full((n + 2 * GUARD,), fill, dtype=dtype, device=device)
    return buf[GUARD:GUARD + n], buf


def _check_guards(buf, n, what):
    for part in (buf[:GUARD], buf[GUARD + n:]):
        if part.dtype.is_floating_point:
            assert bool(part.isnan().all()), f"{what}: write outside the tensor"
        else:
            assert bool((part == -1).all()), f"{what}: write outside the tensor"


#: ``s_dtype`` of a case whose steps are per-tensor host counts (0-dim fp32 CPU tensors)
HOST = "host"


def make_case(sizes, p_dtype, m_dtype, s_dtype, seed, device):
    """Five lists of guarded tensors (params, grads, exp_avgs, exp_avg_sqs, steps) with random contents; with
    ``s_dtype == HOST`` the steps are per-tensor host counts (their guard buffers are None)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    limit = 32767 if s_dtype == torch.int16 else 2**24
    lists, bufs = [[], [], [], [], []], [[], [], [], [], []]
    for t_pos, n in enumerate(sizes):
        def rnd():
            x = torch.randn(n, generator=g)
            return x.masked_fill_(x == 0, 0.5)

        counts = torch.randint(0, 6, (n,), generator=g)
        if n > 3:  # saturation point and neighbours
            counts[:3] = torch.tensor([limit - 1, limit, 0])
        contents = [rnd(), rnd() * 0.5, rnd() * 0.1, torch.rand(n, generator=g) * 0.05 + 1e-4, counts]
        if s_dtype == HOST:  # counts 0, 1, the saturation point and its neighbour, repeated (shared counts)
            lists[4].append(torch.tensor(float([0, 3, limit - 1, limit, 1, 3][t_pos % 6])))
            bufs[4].append(None)
        for j, (data, dtype) in enumerate(zip(contents, (p_dtype, p_dtype, m_dtype, m_dtype, s_dtype))):
            if dtype == HOST:
                continue
            view, buf = _guarded(n, dtype, device)
            view.copy_(data.to(dtype))
            lists[j].append(view)
            bufs[j].append(buf)
    return lists, bufs


def _clone(lists):
    return [[t.clone() for t in lst] for lst in lists]


def check_adamw(kernel, device, sizes=(1, 7, 1000, 2053, 0, 4096 + 5), combos=None, hypers=HYPER, seed=0) -> int:
    """Run ``kernel`` (a backend's adamw_step) against float64 truth; returns the number of checks."""
    from spiel.ops._dispatch import kernel_for

    reference = kernel_for("adamw_step", "torch")
    if combos is None:
        combos = [(p, m, s) for p in PARAM_DTYPES for m in STATE_DTYPES for s in STEP_DTYPES + [HOST]]
    checks = 0
    for c, (p_dtype, m_dtype, s_dtype) in enumerate(combos):
        for h, hyper in enumerate(hypers):
            what = f"p={p_dtype} state={m_dtype} steps={s_dtype} hyper={h}"
            lists, bufs = make_case(sizes, p_dtype, m_dtype, s_dtype, seed + 97 * c + h, device)
            truth = [[t.double() for t in lst] for lst in lists[:4]] + [[t.clone() for t in lists[4]]]
            before = [[t.double() for t in lst] for lst in lists[:4]]
            plain = _clone(lists)
            args = (hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"],
                    hyper["maximize"])
            reference(*truth, *args)
            reference(*plain, *args)
            kernel(*lists, *args)
            for j, name in enumerate(("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")):
                for i, n in enumerate(sizes):
                    if bufs[j][i] is not None:
                        _check_guards(bufs[j][i], n, f"{what} {name}[{i}]")
                    got = lists[j][i]
                    if name == "grads":
                        assert torch.equal(got, plain[j][i]), f"{what}: grads[{i}] modified"
                        continue
                    if name == "steps":
                        assert torch.equal(got, truth[j][i]), f"{what}: steps[{i}] differ"
                        continue
                    want = truth[j][i]
                    err = (got.double() - want).abs()
                    ref_err = (plain[j][i].double() - want).abs()
                    half_ulp = want.abs() * torch.finfo(got.dtype).eps / 2 + torch.finfo(got.dtype).tiny
                    # fp32 arithmetic error, relative to the operands (not the result: m + (1 - b1)(g - m)
                    # cancels); for p, the update carries ~1e-4 relative error from 1 - beta^t in fp32
                    grad = before[1][i].abs()
                    scale = {"params": before[0][i].abs() + 1e3 * (want - before[0][i]).abs(),
                             "exp_avgs": before[2][i].abs() + grad,
                             "exp_avg_sqs": before[3][i].abs() + grad * grad}[name]
                    # the kernel may round the other way than the reference: one ulp of slack
                    bound = 4 * ref_err + 2 * half_ulp + 8 * torch.finfo(torch.float32).eps * scale
                    bad = err > bound
                    if bool(bad.any()):
                        k = int(bad.nonzero()[0])
                        raise AssertionError(f"{what}: {name}[{i}] element {k}: got {got[k].item()!r}, "
                                             f"float64 {want[k].item()!r}, fp32 reference "
                                             f"{plain[j][i][k].item()!r} ({int(bad.sum())} bad)")
                    checks += 1
    return checks


# ---- reference and public op (in process) ----------------------------------------------------------------

def test_reference_matches_float64_closely():
    """The fp32 reference itself: within a few fp32/bf16 ulps of float64 (its error sets the kernels' bound)."""
    from spiel.ops._dispatch import kernel_for

    reference = kernel_for("adamw_step", "torch")
    for p_dtype in PARAM_DTYPES:
        lists, _ = make_case((1000,), p_dtype, torch.float32, torch.int32, 5, "cpu")
        truth = [[t.double() for t in lst] for lst in lists[:4]] + [[t.clone() for t in lists[4]]]
        before = truth[0][0].clone()
        reference(*truth, 1e-2, 0.9, 0.999, 1e-8, 0.1, False)
        reference(*lists, 1e-2, 0.9, 0.999, 1e-8, 0.1, False)
        err = (lists[0][0].double() - truth[0][0]).abs()
        # rounding of the result, plus fp32 error in the update itself: 1 - beta2^t in fp32 is off by
        # ~1e-4 relative at t = 1 (fl(0.999) alone is 6e-5 away), amplified by nothing else
        bound = truth[0][0].abs() * torch.finfo(p_dtype).eps + 1e-4 * (truth[0][0] - before).abs() + 1e-12
        assert bool((err <= bound).all()), (p_dtype, (err / bound).max().item())
        assert torch.equal(lists[4][0], truth[4][0])


def test_public_op_matches_optimizer_foreach_math():
    """The op (reference backend on CPU) and SparseAdamW's grouped foreach path agree to fp32 rounding."""
    import spiel.ops as ops
    from spiel.optim.adamw import adamw_foreach

    lists, _ = make_case((7, 1000, 33), torch.float32, torch.float32, torch.int16, 11, "cpu")
    other = _clone(lists)
    ops.adamw_step_(*lists, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    adamw_foreach(*other, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for j in range(5):
        for a, b in zip(lists[j], other[j]):
            torch.testing.assert_close(a, b, rtol=3e-6, atol=1e-7)


def test_bad_input():
    import spiel.ops as ops

    lists, _ = make_case((5, 9), torch.float32, torch.float32, torch.int16, 1, "cpu")
    p, g, m, v, s = lists
    with pytest.raises(ValueError, match="grads has 1 tensors, params has 2"):
        ops.adamw_step_(p, g[:1], m, v, s, lr=1e-3)
    with pytest.raises(TypeError, match="params must all have one dtype"):
        ops.adamw_step_([p[0], p[1].double()], g, m, v, s, lr=1e-3)
    with pytest.raises(TypeError, match="grads must have the params' dtype"):
        ops.adamw_step_(p, [x.bfloat16() for x in g], m, v, s, lr=1e-3)
    with pytest.raises(TypeError, match="exp_avgs and exp_avg_sqs must have one dtype"):
        ops.adamw_step_(p, g, m, [x.bfloat16() for x in v], s, lr=1e-3)
    with pytest.raises(TypeError, match="steps must have dtype in"):
        ops.adamw_step_(p, g, m, v, [x.long() for x in s], lr=1e-3)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] must have the shape of params\[1\]"):
        ops.adamw_step_(p, g, [m[0], m[1][:4]], v, s, lr=1e-3)
    with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
        ops.adamw_step_([torch.zeros(5, 2).t()], [torch.zeros(2, 5)], [torch.zeros(2, 5)], [torch.zeros(2, 5)],
                        [torch.zeros(2, 5, dtype=torch.int16)], lr=1e-3)
    with pytest.raises(ValueError, match="lr must be in"):
        ops.adamw_step_(p, g, m, v, s, lr=-1.0)
    with pytest.raises(ValueError, match="beta2 must be in"):
        ops.adamw_step_(p, g, m, v, s, lr=1e-3, beta2=1.0)
    with pytest.raises(TypeError, match="params must be a list of tensors"):
        ops.adamw_step_(p[0], g, m, v, s, lr=1e-3)
    ops.adamw_step_([], [], [], [], [], lr=1e-3)  # nothing to do


def test_opcheck():
    lists, _ = make_case((5, 9), torch.float32, torch.bfloat16, torch.int16, 2, "cpu")
    lists = _clone(lists)
    torch.library.opcheck(torch.ops.spiel.adamw_step_.default, (*lists, 1e-3, 0.9, 0.999, 1e-8, 0.01, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_sparse_adamw_fused_matches_foreach():
    """SparseAdamW(fused=True) (the op) and fused=False (grouped foreach) train the same, index updates and
    bf16 moments included."""
    from torch import nn

    from spiel.nn import SparseDeltaLinear
    from spiel.optim import SparseAdamW

    torch.manual_seed(0)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        layers = nn.ModuleList([SparseDeltaLinear(12, 9, num_deltas=20, generator=torch.Generator().manual_seed(i))
                                for i in range(3)])
        opt = SparseAdamW(layers, lr=1e-2, weight_decay=0.05, state_dtype=torch.bfloat16, fused=fused)
        x = torch.randn(6, 12)
        for step in range(4):
            loss = sum(layer(x).square().sum() for layer in layers)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 1:  # regrow two slots of layer 0
                regrown = torch.zeros(20, dtype=torch.bool)
                regrown[[3, 11]] = True
                opt.reindex(layers[0], torch.arange(20), regrown)
        runs.append([layer.values.detach().clone() for layer in layers])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sparse_adamw_fused_argument():
    from spiel.nn import SparseDeltaLinear
    from spiel.optim import SparseAdamW

    layer = SparseDeltaLinear(4, 4, num_deltas=3)
    with pytest.raises(TypeError, match="fused must be None or a bool"):
        SparseAdamW([layer], fused="yes")


# ---- Triton through the interpreter (one child process) --------------------------------------------------

def check_repeated_calls(kernel, device) -> int:
    """The same tensors stepped three times (the Triton address table is reused from the second call on), then
    one tensor swapped for a new one (a new table): every result tracks the fp32 reference."""
    from spiel.ops._dispatch import kernel_for

    reference = kernel_for("adamw_step", "torch")
    lists, _ = make_case((7, 3000, 1), torch.float32, torch.float32, torch.int16, 21, device)
    plain = _clone(lists)
    args = (1e-2, 0.9, 0.999, 1e-8, 0.0, False)
    checks = 0
    for call in range(4):
        if call == 3:  # a reindex replaces state tensors: new addresses
            for j in range(5):
                lists[j][1] = lists[j][1].clone()
        kernel(*lists, *args)
        reference(*plain, *args)
        for j in range(5):
            for got, want in zip(lists[j], plain[j]):
                # rounding drift over 4 steps only; a wrong table would give unrelated numbers
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
                checks += 1
    return checks


def _groups():
    from spiel.ops._dispatch import kernel_for

    tri = kernel_for("adamw_step", "triton")
    return {
        "triton_repeated_calls": lambda d: check_repeated_calls(tri, d),
        "triton_all_dtypes": lambda d: check_adamw(tri, d, sizes=(1, 7, 0, 2053), hypers=HYPER[:2]),
        "triton_lr0_and_blocks": lambda d: check_adamw(
            tri, d, sizes=(4096 + 5, 3), hypers=HYPER[2:] + HYPER[:1],
            combos=[(torch.bfloat16, torch.float32, torch.int16), (torch.float32, torch.float32, torch.float32),
                    (torch.float32, torch.bfloat16, HOST)]),
    }


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreted.interpreter_results(__file__, _groups)


@pytest.mark.parametrize("group", ["triton_all_dtypes", "triton_lr0_and_blocks", "triton_repeated_calls"])
def test_triton_interpreted(interpreter_results, group):
    res = interpreter_results[group]
    assert res["ok"], res["msg"]


if __name__ == "__main__":
    sys.exit(interpreted.child_main(_groups))


def test_host_counts_reference_and_mixed_call():
    """Per-tensor host counts (0-dim fp32 CPU steps): the reference against float64 (check_adamw with HOST
    steps), and one public call mixing both kinds equals two calls of one kind each; the unfused foreach math
    (SparseAdamW's CPU path) agrees with the op."""
    import spiel.ops as ops
    from spiel.ops._dispatch import kernel_for
    from spiel.optim.adamw import adamw_foreach

    assert check_adamw(kernel_for("adamw_step", "torch"), "cpu", sizes=(1, 7, 1000, 5, 3, 0),
                       combos=[(torch.float32, torch.float32, HOST), (torch.bfloat16, torch.bfloat16, HOST)]) > 0
    slot, _ = make_case((7, 1000), torch.float32, torch.float32, torch.int16, 3, "cpu")
    host, _ = make_case((33, 5, 9), torch.float32, torch.float32, HOST, 4, "cpu")
    mixed = [a[:1] + b + a[1:] for a, b in zip(_clone(slot), _clone(host))]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    ops.adamw_step_(*mixed, **hyper)
    split_slot, split_host = _clone(slot), _clone(host)
    ops.adamw_step_(*split_slot, **hyper)
    ops.adamw_step_(*split_host, **hyper)
    for j in range(5):
        want = split_slot[j][:1] + split_host[j] + split_slot[j][1:]
        for a, b in zip(mixed[j], want):
            assert torch.equal(a, b)
    assert [float(s) for s in split_host[4]] == [1.0, 4.0, 2.0**24]
    foreach = _clone(host)
    adamw_foreach(*foreach, **hyper)
    for j in range(5):
        for a, b in zip(foreach[j], split_host[j]):
            torch.testing.assert_close(a, b, rtol=3e-6, atol=1e-7)
    # an empty tensor's per-tensor count advances too (torch's AdamW counts every parameter), in every path
    for run in (lambda *a: ops.adamw_step_(*a, **hyper), lambda *a: adamw_foreach(*a, **hyper)):
        empty, _ = make_case((0, 0, 4), torch.float32, torch.float32, HOST, 5, "cpu")
        run(*empty)
        assert [float(s) for s in empty[4]] == [1.0, 4.0, 2.0**24]


def test_host_counts_bad_input():
    import spiel.ops as ops

    lists, _ = make_case((5, 9), torch.float32, torch.float32, HOST, 1, "cpu")
    p, g, m, v, s = lists
    with pytest.raises(TypeError, match=r"steps\[1\] is 0-dim: a per-tensor count must be a float32 CPU tensor"):
        ops.adamw_step_(p, g, m, v, [s[0], torch.tensor(3, dtype=torch.int32)], lr=1e-3)
    with pytest.raises(ValueError, match=r"steps\[0\] must have the shape of params\[0\]"):
        ops.adamw_step_(p, g, m, v, [torch.zeros(4, dtype=torch.int16), s[1]], lr=1e-3)
