"""No out x in tensor survives between a layer's forward and its backward.

Two independent checks, each proven to catch a deliberately bad layer:
- ``saved_tensors_hooks``: what autograd saves for backward (must be input, indices, values [, plan]);
- a ``TorchDispatchMode`` that records the storage of every tensor an op allocates during forward and,
  after forward (before backward), lists those of >= out*in elements still alive: catches an out x in tensor
  kept anywhere (saved, stashed on ``ctx``, cached on the module), with or without gradient checkpointing.
"""
import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import spiel.ops as ops
from spiel.nn import SparseDeltaLinear
from spiel.quant import NF4Weight

IN, OUT, T = 96, 80, 4  # T * IN and T * OUT are far below OUT * IN


class LiveAllocations(TorchDispatchMode):
    """Weak references to the storages of the large tensors ops return while active."""

    def __init__(self, min_elements: int, ignore=()):
        super().__init__()
        self.min_elements = min_elements
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_elements:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.ignore:
                    self.refs.append((str(func), tuple(t.shape), StorageWeakRef(storage)))
        return out

    def alive(self):
        gc.collect()
        return [(f, s) for f, s, r in self.refs if not r.expired()]


def _layer(kind="dense", bias=True):
    torch.manual_seed(0)
    if kind == "nf4":
        layer = SparseDeltaLinear.from_linear(NF4Weight.quantize(torch.randn(OUT, IN), dtype=torch.float32),
                                              density=0.05, bias=torch.zeros(OUT) if bias else None)
    else:
        layer = SparseDeltaLinear(IN, OUT, bias=bias, density=0.05)
    with torch.no_grad():
        layer.values.normal_()
    return layer


# ---- deliberately bad variants: they keep the merged weight for backward ------------------------------
class _SavesMerged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, indices, values):
        merged = ops.effective_weight(weight, indices, values, x.dtype)
        ctx.save_for_backward(x, indices, merged)
        return F.linear(x, merged)

    @staticmethod
    def backward(ctx, go):
        x, indices, merged = ctx.saved_tensors
        dw = go.reshape(-1, go.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return go @ merged, None, None, dw.view(-1)[indices.long()]


class _StashesMerged(_SavesMerged):
    @staticmethod
    def forward(ctx, x, weight, indices, values):
        merged = ops.effective_weight(weight, indices, values, x.dtype)
        ctx.save_for_backward(x, indices)
        ctx.merged = merged  # not through save_for_backward: invisible to saved_tensors_hooks
        return F.linear(x, merged)

    @staticmethod
    def backward(ctx, go):
        x, indices = ctx.saved_tensors
        dw = go.reshape(-1, go.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return go @ ctx.merged, None, None, dw.view(-1)[indices.long()]


class BadSaves(SparseDeltaLinear):
    def forward(self, x):
        return _SavesMerged.apply(x, self.weight, self.indices, self.values)


class BadStashes(SparseDeltaLinear):
    def forward(self, x):
        return _StashesMerged.apply(x, self.weight, self.indices, self.values)


def _bad(cls):
    layer = _layer()
    layer.__class__ = cls
    return layer


# ---- the checks ------------------------------------------------------------------------------------------
def saved_for_backward(layer, x):
    """Shapes of everything autograd saves during forward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return y, saved


def large_alive_after_forward(layer, x, use_checkpoint=False):
    mode = LiveAllocations(OUT * IN, ignore=[p for p in layer.parameters()] + [b for b in layer.buffers()])
    with mode:
        if use_checkpoint:
            y = checkpoint(layer, x, use_reentrant=False)
        else:
            y = layer(x)
    alive = mode.alive()
    y.sum().backward()  # backward still works
    return alive


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("lead", [(T,), (2, T)])
def test_saves_only_input_and_values(kind, lead):
    """Saved for backward (through the saved-tensor hooks, i.e. what checkpointing packs): the input and the
    values only; the indices and the sddmm plan are the layer's buffers, kept by reference."""
    layer = _layer(kind)
    x = torch.randn(*lead, IN, requires_grad=True)
    y, saved = saved_for_backward(layer, x)
    assert all(t.numel() < OUT * IN for t in saved), [tuple(t.shape) for t in saved]
    ids = {id(t) for t in saved}
    assert id(layer.values) in ids
    assert id(layer.indices) not in ids
    assert any(t is x or (t.shape == x.shape and t.data_ptr() == x.data_ptr()) for t in saved)
    extra = [t for t in saved if t is not layer.values and t.data_ptr() != x.data_ptr()]
    assert extra == [], [tuple(t.shape) for t in extra]
    y.sum().backward()
    assert layer.values.grad is not None


def test_saved_hooks_catch_bad_layer():
    layer = _bad(BadSaves)
    _, saved = saved_for_backward(layer, torch.randn(T, IN, requires_grad=True))
    assert any(t.numel() >= OUT * IN for t in saved)  # the check fails on a layer that saves the merged weight


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_no_large_tensor_alive_between_forward_and_backward(kind, use_checkpoint):
    layer = _layer(kind)
    x = torch.randn(T, IN, requires_grad=True)
    assert large_alive_after_forward(layer, x, use_checkpoint) == []


def test_no_large_tensor_alive_with_candidates():
    layer = _layer()
    free = sorted(set(range(OUT * IN)) - set(layer.indices.tolist()))
    layer.set_candidates(torch.tensor(free[::50]))
    assert large_alive_after_forward(layer, torch.randn(T, IN, requires_grad=True)) == []


@pytest.mark.parametrize("cls", [BadSaves, BadStashes])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_live_allocation_check_catches_bad_layers(cls, use_checkpoint):
    layer = _bad(cls)
    alive = large_alive_after_forward(layer, torch.randn(T, IN, requires_grad=True), use_checkpoint)
    if use_checkpoint and cls is BadSaves:
        # checkpointing discards what goes through save_for_backward (recomputed in backward): harmless there
        assert alive == []
    else:  # a tensor kept on ctx (or anywhere else) stays alive even under checkpointing: caught
        assert any(shape == (OUT, IN) for _, shape in alive), alive


def test_tracker_sees_merge_allocations():
    # sanity: the tracker does see the transient merged weight the good layer builds (and frees)
    layer = _layer()
    mode = LiveAllocations(OUT * IN, ignore=list(layer.parameters()) + list(layer.buffers()))
    with mode:
        y = layer(torch.randn(T, IN, requires_grad=True))
    assert any(shape == (OUT, IN) for _, shape, _ in mode.refs)
    assert mode.alive() == []
    del y


def test_model_with_checkpointing_keeps_nothing_large():
    torch.manual_seed(0)
    blocks = nn.ModuleList([SparseDeltaLinear(IN, IN, density=0.05) for _ in range(3)])
    x = torch.randn(T, IN, requires_grad=True)
    params = [p for b in blocks for p in b.parameters()] + [b_ for b in blocks for b_ in b.buffers()]
    for use_checkpoint in (False, True):
        mode = LiveAllocations(IN * IN, ignore=params)
        with mode:
            h = x
            for b in blocks:
                h = checkpoint(b, h, use_reentrant=False) if use_checkpoint else torch.tanh(b(h))
        assert mode.alive() == []
        h.sum().backward()


def test_candidate_gradients_hold_only_c_floats():
    """AG candidates cost c fp32 for their gradient and nothing for their (zero) values: autograd adds each
    backward into the pre-made ``.grad`` in place, so no backward's (k + c)-float sddmm output stays alive
    through the window as a view (with the values' gradient, whose slice it shares, set to None between steps).
    Without a GradScaler the scheduler accumulates in that same ``.grad``."""
    from spiel.optim import SparseAdamW
    from spiel.scheduler import SpielScheduler

    torch.manual_seed(0)
    layer = SparseDeltaLinear(IN, OUT, num_deltas=500, generator=torch.Generator().manual_seed(0))
    candidates = torch.tensor(sorted(set(range(0, OUT * IN, 7)) - set(layer.indices.tolist())))[:300]
    layer.set_candidates(candidates)
    cv = layer.candidate_values
    assert cv.untyped_storage().nbytes() == 4 and cv.shape == (300,)  # one broadcast zero
    grad = cv.grad
    steps = []
    for t in range(3):
        x = torch.randn(T, IN, generator=torch.Generator().manual_seed(t))
        go = torch.randn(T, OUT, generator=torch.Generator().manual_seed(10 + t))
        layer(x).backward(go)
        steps.append(ops.sddmm(go, x, candidates, OUT, IN))
        assert cv.grad is grad and grad.untyped_storage().nbytes() == 4 * 300  # in place, its own buffer
        assert layer.values.grad.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr()
        layer.values.grad = None
    torch.testing.assert_close(grad, steps[0] + steps[1] + steps[2])
    layer.clear_candidates()

    opt = SparseAdamW(layer, lr=0.01)
    # two candidates per slot: installed and accumulated (with one they are deferred, see test_scheduler)
    sched = SpielScheduler(layer, opt, "ag", total_steps=100, reselection_steps=6, accumulation_steps=3,
                           candidates_per_slot=2)
    for t in range(4):  # the probe fires in step 3's backward; the candidates are installed after it
        layer(torch.randn(T, IN)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert sched._window is not None and sched._window["accs"][0] is layer.candidate_values.grad
