"""Fused AdamW over lists of tensors with per-slot step counts: ``spiel::adamw_step_``.

SpIEL regrows indices during training; a regrown slot restarts Adam's bias correction, so the step count is a
tensor shaped like the values (``spiel.optim.SparseAdamW``). torch's fused/foreach AdamW take one count per
tensor, so the unfused update is a chain of ~20 ``torch._foreach_*`` launches per group of tensors. This op is
the whole update in one pass over the five lists: it reads params, grads, both moments and the counts once and
writes params, moments and counts once (32 B per fp32 delta with int16 counts). The CUDA and Triton kernels
cover every tensor of a call in one launch (per 48 tensors for CUDA); the reference backend is the plain
per-tensor math in fp32. A tensor may instead have one count (a 0-dim fp32 CPU tensor, as torch's AdamW keeps
it): the kernels then take the count as an argument (one launch per distinct count) and it is incremented on
the host (``SparseAdamW(per_slot_steps=False)``: 2 B per delta less).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from . import _dispatch
from ._validate import check_same_device

__all__ = ["adamw_step_", "adamw_step_eager", "adamw_step_limit", "is_host_count", "host_count_groups",
           "bump_host_counts", "ADAMW_PARAM_DTYPES", "ADAMW_STATE_DTYPES", "ADAMW_STEP_DTYPES"]

ADAMW_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ADAMW_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ADAMW_STEP_DTYPES = (torch.int16, torch.int32, torch.float32)
#: Largest tensor the kernels accept (their offsets are int32).
ADAMW_MAX_NUMEL = 2**31 - 2**20

torch.library.define(
    "spiel::adamw_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()",
)


def adamw_step_limit(step_dtype: torch.dtype) -> int:
    """Where per-slot step counts of ``step_dtype`` saturate: 32767 for int16, 2**24 for int32/fp32 (fp32
    counts stay exact up to there). csrc/adamw.cu uses the same limits (``last_count``)."""
    return 32767 if step_dtype == torch.int16 else 2**24


def is_host_count(step: torch.Tensor) -> bool:
    """Whether ``step`` is a per-tensor count (0-dim fp32 on the CPU) rather than per-slot counts."""
    return step.dim() == 0 and step.device.type == "cpu" and step.dtype == torch.float32


def host_count_groups(steps: Sequence[torch.Tensor]) -> List[Tuple[float, List[int]]]:
    """Positions of ``steps`` (per-tensor host counts) grouped by their current count, in first-seen order:
    the kernels take one count per launch. Reading a CPU tensor is no device sync."""
    groups: dict = {}
    for i, s in enumerate(steps):
        groups.setdefault(float(s), []).append(i)
    return list(groups.items())


@torch.no_grad()
def bump_host_counts(steps: Sequence[torch.Tensor]) -> None:
    """``t = min(t, limit - 1) + 1`` on per-tensor host counts (fp32: limit 2**24), after their update."""
    for s in steps:
        s.clamp_(max=float(adamw_step_limit(torch.float32) - 1)).add_(1.0)


def _call_backend(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    """Dispatch, one call per kind of step count: the backends get lists whose counts are all per slot (device
    tensors shaped like the params) or all per tensor (0-dim fp32 CPU tensors)."""
    host = [is_host_count(s) for s in steps]
    kinds = [[i for i, h in enumerate(host) if h == kind] for kind in (False, True)]
    for sel in kinds:
        if not sel:
            continue
        pick = (lambda ts: list(ts)) if len(sel) == len(params) else (lambda ts: [ts[i] for i in sel])  # noqa: E731
        _dispatch.call("adamw_step", params[sel[0]].device, pick(params), pick(grads), pick(exp_avgs),
                       pick(exp_avg_sqs), pick(steps), lr, beta1, beta2, eps, weight_decay, maximize)


@torch.library.impl("spiel::adamw_step_", ["cpu", "cuda"])
def _adamw_step_impl(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    if params:
        _call_backend(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize)


@torch.library.register_fake("spiel::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    torch._check(len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps),
                 lambda: "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length")


def _check_scalar(name: str, value, lo: float, hi: float = math.inf, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (lo <= value and (value < hi if hi_open else value <= hi)) or math.isnan(value):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return value


def _one_dtype(name: str, tensors: Sequence[torch.Tensor], allowed) -> torch.dtype:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"{name} must all have one dtype, got {sorted(str(d) for d in dtypes)} (call once per dtype)")
    dtype = tensors[0].dtype
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype}")
    return dtype


def check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
    """Raise ``TypeError``/``ValueError`` naming the list, the position and what was expected."""
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    n = len(params)
    for name, value in lists.items():
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} tensors, params has {n}: the lists must have the same length")
    if n == 0:
        return
    p_dtype = _one_dtype("params", params, ADAMW_PARAM_DTYPES)
    g_dtype = _one_dtype("grads", grads, ADAMW_PARAM_DTYPES)
    if g_dtype != p_dtype:
        raise TypeError(f"grads must have the params' dtype {p_dtype}, got {g_dtype}")
    m_dtype = _one_dtype("exp_avgs", exp_avgs, ADAMW_STATE_DTYPES)
    v_dtype = _one_dtype("exp_avg_sqs", exp_avg_sqs, ADAMW_STATE_DTYPES)
    if m_dtype != v_dtype:
        raise TypeError(f"exp_avgs and exp_avg_sqs must have one dtype, got {m_dtype} and {v_dtype}")
    for i, t in enumerate(steps):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"steps[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0 and not is_host_count(t):
            raise TypeError(f"steps[{i}] is 0-dim: a per-tensor count must be a float32 CPU tensor, got {t.dtype} "
                            f"on {t.device} (per-slot counts have the shape of params[{i}])")
    _one_dtype("steps", [t for t in steps if t.dim() != 0] or [steps[0]], ADAMW_STEP_DTYPES)
    device = params[0].device
    for i in range(n):
        p = params[i]
        for name in ("grads", "exp_avgs", "exp_avg_sqs", "steps"):
            t = lists[name][i]
            if name == "steps" and t.dim() == 0:
                continue  # a per-tensor host count
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] must have the shape of params[{i}] {tuple(p.shape)}, got {tuple(t.shape)}")
            if t.device != device:
                check_same_device(**{"params[0]": params[0], f"{name}[{i}]": t})
        if p.device != device:
            check_same_device(**{"params[0]": params[0], f"params[{i}]": p})
        for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            if not lists[name][i].is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous (it is updated in place)")
        if p.numel() > ADAMW_MAX_NUMEL:
            raise ValueError(f"params[{i}] has {p.numel()} elements; at most {ADAMW_MAX_NUMEL} per tensor")


def adamw_step_eager(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, maximize: bool = False) -> None:
    """The implementation of ``spiel::adamw_step_`` without the argument checks or the custom-op dispatch, for
    callers that own the state and have checked it (``SparseAdamW``): on a launch-bound step the per-tensor
    checks of :func:`adamw_step_` cost ~1 ms of host time per 200 tensors. Same contract otherwise."""
    if params:
        _call_backend(params, grads, exp_avgs, exp_avg_sqs, steps, float(lr), float(beta1), float(beta2), float(eps),
                      float(weight_decay), bool(maximize))


def adamw_step_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], *, lr: float, beta1: float = 0.9,
                beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, maximize: bool = False) -> None:
    """One AdamW step, in place, with a step count per element (per slot).

    Per element, in fp32 (``t``: that element's count)::

        t = min(t, limit - 1) + 1
        p = p * (1 - lr * weight_decay)
        m = m + (1 - beta1) * (g - m);     v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    (``g`` negated with ``maximize``; ``p`` unchanged beyond the decay when ``lr == 0``.) Each result is rounded
    once to its tensor's dtype; the kernels' fp32 error is of the order of the unfused fp32 math's (tests bound
    both against float64).

    Args:
        params: tensors (any shape, contiguous) of one dtype: fp32, bf16 or fp16.
        grads: same shapes and dtype as ``params`` (read only).
        exp_avgs, exp_avg_sqs: same shapes, contiguous, one dtype between them: fp32, bf16 or fp16.
        steps: per-slot counts (same shapes, contiguous, on the params' device, one dtype: int16 saturating at
            32767, :func:`adamw_step_limit`, int32 or fp32 saturating at 2**24), or per-tensor counts: 0-dim fp32
            CPU tensors (one count for every element of that tensor, as ``torch.optim.AdamW`` keeps it; read and
            incremented on the host, no device memory and no sync). The two kinds may be mixed in one call.
        lr, beta1, beta2, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (decoupled weight decay).

    All tensors on one device; no host sync; nothing is returned or saved. On CUDA the kernels read every
    tensor once and write params, moments and counts once.
    """
    check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, steps)
    lr = _check_scalar("lr", lr, 0.0)
    beta1 = _check_scalar("beta1", beta1, 0.0, 1.0, hi_open=True)
    beta2 = _check_scalar("beta2", beta2, 0.0, 1.0, hi_open=True)
    eps = _check_scalar("eps", eps, 0.0)
    weight_decay = _check_scalar("weight_decay", weight_decay, 0.0)
    if not params:
        return
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    torch.ops.spiel.adamw_step_(list(params), grads, list(exp_avgs), list(exp_avg_sqs), list(steps), lr, beta1,
                                beta2, eps, weight_decay, bool(maximize))
