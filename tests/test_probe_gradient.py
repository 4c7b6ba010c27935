"""The AG probe hands the layer's delta gradient back from its dense-gradient blocks (``reuse_probe_gradient``):
``top_gradient_entries(gather=)`` reads the gathered positions from every block; ``sparse_delta_linear`` uses a
gathering probe's result instead of its sddmm (and falls back when the probe returns None); the scheduler's probe
step gives the same values gradient and the same candidates as with the option off."""
import pytest
import torch

import spiel.ops as ops
from spiel.nn.linear import SparseDeltaLinear
from spiel.optim import SparseAdamW
from spiel.scheduler import SpielScheduler, top_gradient_entries

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("block_elements", [7, 64, 1 << 26])
@pytest.mark.parametrize("k", [0, 5])
def test_gather_reads_the_dense_gradient(block_elements, k):
    g = torch.Generator().manual_seed(block_elements + k)
    go, x = torch.randn(9, 11, generator=g), torch.randn(9, 13, generator=g)
    dense = (go.double().t() @ x.double()).view(-1)
    exclude = torch.randperm(11 * 13, generator=g)[:20].sort().values.to(torch.int32)
    gather = torch.cat([exclude[:7].long(), torch.tensor([0, 11 * 13 - 1])])  # any order, ends included
    pos, score, got = top_gradient_entries(go, x, exclude, k, block_elements, gather=gather)
    want_pos, want_score = top_gradient_entries(go, x, exclude, k, block_elements)
    assert torch.equal(pos, want_pos) and torch.equal(score, want_score)
    assert got.dtype == torch.float32 and got.shape == (gather.numel(),)
    torch.testing.assert_close(got.double(), dense[gather], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="gather"):
        top_gradient_entries(go, x, exclude, k, block_elements, gather=gather.float())


class _Gathering:
    gathers_delta_gradient = True

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, go, x, indices=None):
        self.calls.append(indices)
        return None if self.answer is None else self.answer(go, x, indices)


@pytest.mark.parametrize("answer", ["dense", "none"])
def test_linear_takes_the_probes_gradient(answer):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g)
    indices = torch.tensor([1, 7, 12, 29], dtype=torch.int64)
    values = torch.randn(4, generator=g, requires_grad=True)
    x = torch.randn(3, 5, generator=g)
    marker = torch.tensor([10.0, 20.0, 30.0, 40.0])
    probe = _Gathering(None if answer == "none" else (lambda go, xx, idx: marker))
    ops.sparse_delta_linear(x, w, indices, values, probe=probe).square().sum().backward()
    assert len(probe.calls) == 1 and torch.equal(probe.calls[0], indices)
    if answer == "dense":
        assert torch.equal(values.grad, marker)  # the probe's gradient, no sddmm
    else:
        values2 = values.detach().clone().requires_grad_()
        ops.sparse_delta_linear(x, w, indices, values2).square().sum().backward()
        assert torch.equal(values.grad, values2.grad)  # fell back to the sddmm
    # a plain probe (no attribute) keeps the two-argument call
    seen = []
    values.grad = None
    ops.sparse_delta_linear(x, w, indices, values, probe=lambda go, xx: seen.append(go.shape)).sum().backward()
    assert seen == [(3, 6)] and values.grad is not None


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(SparseDeltaLinear(12, 16, num_deltas=30), torch.nn.Tanh(),
                               SparseDeltaLinear(16, 8, num_deltas=25))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scheduler_probe_step_same_gradient_and_candidates(dtype, device):
    """Two identical runs, reuse on and off: at the probe step the values' gradients agree (exactly up to the
    GEMM's summation order in fp32; to bf16 rounding in bf16, whose CUDA probe blocks are bf16) and the probe
    picks the same candidates."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runs = {}
    for reuse in (True, False):
        model = _model(0).to(device=device, dtype=dtype)
        opt = SparseAdamW(model, lr=1e-2)
        sched = SpielScheduler(model, opt, "ag", total_steps=100, reselection_steps=4, accumulation_steps=1,
                               reuse_probe_gradient=reuse)
        gathered = []
        on_probe = sched._on_probe

        def spy(layer, go, x, indices=None):
            out = on_probe(layer, go, x, indices)
            gathered.append(out is not None)
            return out
        sched._on_probe = spy
        g = torch.Generator().manual_seed(1)
        grads = []
        for step in range(4):
            x = torch.randn(5, 12, generator=g).to(device=device, dtype=dtype)
            model(x).float().square().sum().backward()
            grads.append([m.values.grad.float().cpu() for m in (model[0], model[2])])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        assert sched._probe.gathers_delta_gradient == reuse
        # the probe fired once per layer; with reuse on it handed back the values' gradient
        assert gathered == [reuse, reuse], gathered
        runs[reuse] = (grads, [m.indices.cpu() for m in (model[0], model[2])])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
    for step_grads_on, step_grads_off in zip(runs[True][0], runs[False][0]):
        for a, b in zip(step_grads_on, step_grads_off):
            torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float32:  # same candidates, same update (the first update is at step 4)
        assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))
