"""``SparseAdamW``: AdamW over the sparse deltas of :class:`spiel.nn.SparseDeltaLinear` layers.

Also home of what both spiel optimizers share: finding the sparse layers of a model, the optimizer base class
(param groups, ``reindex`` of per-slot state when the scheduler changes indices, dtype-preserving
``load_state_dict``) and the vectorised AdamW math (``torch._foreach_*`` over groups of at most
:data:`GROUP_NUMEL` deltas: bounded temporaries, launches bounded by the number of groups whatever the number of
layers; no host sync).
"""
from __future__ import annotations

import abc

import copy
import functools
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ops
from ..ops import _dispatch
from ..ops.adamw import (ADAMW_PARAM_DTYPES, adamw_step_eager, adamw_step_limit, bump_host_counts,
                         host_count_groups, is_host_count)

__all__ = ["SparseAdamW", "sparse_layers", "is_sparse_layer", "layer_shape", "adamw_foreach", "GROUP_NUMEL"]


# ------------------------------------------------------------------------------------------------ layers
def is_sparse_layer(module) -> bool:
    """Whether ``module`` follows the SparseDeltaLinear layer contract (``indices`` buffer, ``values``
    Parameter, ``set_indices``)."""
    return (isinstance(module, nn.Module) and isinstance(getattr(module, "indices", None), torch.Tensor)
            and isinstance(getattr(module, "values", None), nn.Parameter)
            and callable(getattr(module, "set_indices", None)))


def sparse_layers(model_or_layers) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every sparse-delta layer, in ``named_modules`` order (deterministic, identical on
    every rank). ``model_or_layers`` is an ``nn.Module`` (searched recursively; a DDP/FSDP wrapper is fine) or
    an iterable of layers (named ``"0"``, ``"1"``, ...)."""
    if isinstance(model_or_layers, nn.Module):
        found = [(n, m) for n, m in model_or_layers.named_modules() if is_sparse_layer(m)]
    else:
        found = []
        for i, m in enumerate(model_or_layers):
            if not is_sparse_layer(m):
                raise TypeError(f"element {i} is a {type(m).__name__}, not a SparseDeltaLinear-like layer")
            found.append((str(i), m))
    seen, out = set(), []
    for n, m in found:  # a layer reachable twice (shared module) counts once
        if id(m) not in seen:
            seen.add(id(m))
            out.append((n, m))
    return out


def layer_shape(layer) -> Tuple[int, int]:
    """(out_features, in_features) of a sparse layer."""
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return int(layer.out_features), int(layer.in_features)
    w = getattr(layer, "compute_weight", None)
    w = layer.weight if w is None else w
    return int(w.shape[0]), int(w.shape[1])


# ------------------------------------------------------------------------------------------------ AdamW math
#: Most elements (deltas) one grouped launch sequence of the sparse optimizers works on. The optimizers' step
#: temporaries scale with it (SparseAdamW: 8 B per element with fp32 values and state, SM3: ~16 B), not with the
#: total number of deltas; the number of launches per step is about (total deltas / GROUP_NUMEL + 1) x a constant.
#: Read at every step (a per-optimizer ``group_numel`` argument overrides it).
GROUP_NUMEL = 2 ** 24

#: Saturation point of an int16 per-slot step count. Past it the fp32 bias corrections ``1 - beta**t`` are exactly
#: 1 for every beta with ``beta**32767 <= 2**-26`` (beta <= 0.99947, e.g. 0.999), so saturating changes nothing;
#: SparseAdamW picks int32 step counts (exact up to 2**24 steps, as fp32 ones) for betas closer to 1.
INT16_STEP_LIMIT = adamw_step_limit(torch.int16)

#: Largest per-slot step count stored in a dtype (counts saturate there): the fused op's own rule, one definition.
step_limit = adamw_step_limit


def step_dtype_for(betas: Tuple[float, float]) -> torch.dtype:
    """The compact per-slot step dtype that keeps the AdamW math exact for ``betas``: int16 if both
    ``beta**32767 <= 2**-26`` (the fp32 bias corrections are exactly 1 from the saturation point on), else int32."""
    return torch.int16 if max(float(b) for b in betas) ** INT16_STEP_LIMIT <= 2.0 ** -26 else torch.int32


def resolve_group_numel(group_numel: Optional[int]) -> int:
    """``group_numel`` validated (None: the module's :data:`GROUP_NUMEL`)."""
    value = GROUP_NUMEL if group_numel is None else group_numel
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"group_numel must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"group_numel must be >= 1, got {value}")
    return value


def _segment_groups(numels: Sequence[int], group_numel: int) -> List[List[Tuple[int, int, int]]]:
    """Cut tensors of ``numels`` elements, in order, into groups of at most ``group_numel`` elements: each group
    is a list of ``(tensor position, start, length)`` slices (a tensor larger than a group spans several)."""
    groups: List[List[Tuple[int, int, int]]] = []
    cur: List[Tuple[int, int, int]] = []
    size = 0
    for i, n in enumerate(numels):
        start = 0
        while start < n:
            take = min(n - start, group_numel - size)
            cur.append((i, start, take))
            size += take
            start += take
            if size == group_numel:
                groups.append(cur)
                cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


def _flat(t: torch.Tensor, what: str, writable: bool = True) -> torch.Tensor:
    if t.is_contiguous():
        return t.view(-1)
    if writable:
        raise ValueError(f"{what} must be contiguous (updated in place)")
    return t.reshape(-1)


def _slices(tensors: Sequence[torch.Tensor], seg, what: str, writable: bool = True) -> List[torch.Tensor]:
    out = []
    for i, start, length in seg:
        t = _flat(tensors[i], what, writable)
        out.append(t if (start == 0 and length == t.numel()) else t.narrow(0, start, length))
    return out


def _fp32_copy(src: List[torch.Tensor], lens: List[int], n: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """A flat fp32 buffer holding ``src`` (one ``_foreach_copy_``), and its views shaped like ``src``."""
    buf = torch.empty(n, dtype=torch.float32, device=src[0].device)
    views = list(buf.split(lens))
    torch._foreach_copy_(views, src)
    return buf, views


def _adamw_group(P, G, M, V, S, lens, n, *, lr, beta1, beta2, eps, weight_decay, maximize, limit) -> None:
    """AdamW on one group of flat slices (same dtypes within each list; ``n`` elements in all). Temporaries:
    two fp32 buffers of ``n`` elements (``t``: step counts, then bias corrections; the denominator), plus one
    fp32 copy per list that is not fp32 (the grads' copy is reused as ``t``, the ``exp_avg_sq`` one as the
    denominator)."""
    f32 = torch.float32
    p32, pbuf = P, None
    if P[0].dtype != f32:
        pbuf, p32 = _fp32_copy(P, lens, n)
    g32, gbuf = G, None
    if G[0].dtype != f32 or maximize:
        gbuf, g32 = _fp32_copy(G, lens, n)
        if maximize:
            gbuf.neg_()
    m32, mbuf = M, None
    if M[0].dtype != f32:
        mbuf, m32 = _fp32_copy(M, lens, n)
    v32, vbuf = V, None
    if V[0].dtype != f32:
        vbuf, v32 = _fp32_copy(V, lens, n)
    if weight_decay != 0.0:
        torch._foreach_mul_(p32, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(m32, g32, 1.0 - beta1)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, g32, g32, 1.0 - beta2)
    if mbuf is not None:
        torch._foreach_copy_(M, m32)
    if vbuf is not None:
        torch._foreach_copy_(V, v32)
    # per-slot step counts, saturating: t = min(t, limit - 1) + 1, in fp32 (exact: limit <= 2**24; integer
    # foreach clamps are no fused launch on CUDA)
    if gbuf is not None:
        t, tv = gbuf, g32  # the grads are not needed any more
    else:
        t = torch.empty(n, dtype=f32, device=P[0].device)
        tv = list(t.split(lens))
    del g32, gbuf
    torch._foreach_copy_(tv, S)
    t.clamp_max_(limit - 1).add_(1.0)
    torch._foreach_copy_(S, tv)
    if lr != 0.0:
        torch.pow(beta2, t, out=t)
        t.sub_(1.0).neg_().sqrt_()  # sqrt(1 - beta2^t)
        if vbuf is not None:
            vbuf.sqrt_()  # the fp32 exp_avg_sq (written back already) becomes the denominator
            dv = v32
        else:
            dv = torch._foreach_sqrt(v32)
        torch._foreach_div_(dv, tv)
        torch._foreach_add_(dv, eps)  # sqrt(v) / sqrt(1 - beta2^t) + eps
        torch._foreach_copy_(tv, S)
        torch.pow(beta1, t, out=t)
        t.sub_(1.0).div_(lr).reciprocal_()  # -lr / (1 - beta1^t): the (negative) step size
        torch._foreach_div_(dv, tv)
        del t, tv
        torch._foreach_addcdiv_(p32, m32, dv)
    if pbuf is not None:
        torch._foreach_copy_(P, p32)


@torch.no_grad()
def adamw_foreach(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                  exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, maximize: bool = False,
                  group_numel: Optional[int] = None) -> None:
    """One AdamW step on lists of tensors, with TENSOR step counts: ``steps[i]`` has the shape of ``params[i]``
    (per-slot bias correction; fp32, or int16/int32 counts that saturate at :func:`step_limit`), or is 0-dim
    (a dense parameter, one count).

    Math (torch.optim.AdamW, per element): ``t += 1; p *= 1 - lr*wd; m = b1*m + (1-b1)*g;
    v = b2*v + (1-b2)*g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``, computed in fp32 (bf16/fp16
    params or states are upcast and written back rounded). Tensors with per-slot steps are processed in groups
    of at most ``group_numel`` (default :data:`GROUP_NUMEL`) elements: the temporaries are two fp32 buffers of
    one group (plus one per non-fp32 list), and the launches per call are bounded by the number of groups
    (and dtype combinations), whatever the number of tensors. No host sync.
    """
    n_t = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n_t):
        raise ValueError("adamw_foreach: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length")
    if not n_t:
        return
    group_numel = resolve_group_numel(group_numel)
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), maximize=bool(maximize))
    buckets: Dict[tuple, List[int]] = defaultdict(list)
    host: Dict[tuple, List[int]] = defaultdict(list)
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"adamw_foreach: tensor {i}: grad, exp_avg and exp_avg_sq must have the shape of the "
                             f"param {tuple(p.shape)}")
        if is_host_count(s) and p.dim() != 0:
            host[(p.device, p.dtype, g.dtype, m.dtype, v.dtype)].append(i)
            continue
        if s.dim() == 0 and p.dim() != 0:
            _adamw_dense([p], [g], [m], [v], [s], **hyper)
            continue
        if s.shape != p.shape:
            raise ValueError(f"adamw_foreach: steps[{i}] must be 0-dim or have the param's shape {tuple(p.shape)}, "
                             f"got {tuple(s.shape)}")
        if s.is_complex() or s.dtype == torch.bool:
            raise TypeError(f"adamw_foreach: steps[{i}] must be a real (int16/int32/float32) tensor, got {s.dtype}")
        if p.numel():
            buckets[(p.device, p.dtype, g.dtype, m.dtype, v.dtype, s.dtype)].append(i)
    for sel in host.values():
        sub = lambda ts: [ts[i] for i in sel]  # noqa: E731
        _adamw_host_counts(sub(params), sub(grads), sub(exp_avgs), sub(exp_avg_sqs), sub(steps), **hyper)
    for key, sel in buckets.items():
        limit = step_limit(key[-1])
        sub = lambda ts: [ts[i] for i in sel]  # noqa: E731
        P, G, M, V, S = sub(params), sub(grads), sub(exp_avgs), sub(exp_avg_sqs), sub(steps)
        for seg in _segment_groups([p.numel() for p in P], group_numel):
            lens = [length for _, _, length in seg]
            _adamw_group(_slices(P, seg, "params"), _slices(G, seg, "grads", writable=False),
                         _slices(M, seg, "exp_avgs"), _slices(V, seg, "exp_avg_sqs"), _slices(S, seg, "steps"),
                         lens, sum(lens), limit=limit, **hyper)


def _adamw_host_counts(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                       maximize=False) -> None:
    """AdamW on tensors with per-tensor host counts (0-dim fp32 CPU steps): the bias corrections are Python
    floats, one foreach chain per distinct count (no host sync; fp32 copies of the non-fp32 lists)."""
    limit = step_limit(torch.float32)
    for count, sel in host_count_groups(steps):
        t = min(count, limit - 1) + 1.0
        sub = lambda ts: [ts[i] for i in sel]  # noqa: E731
        P, M, V = sub(params), sub(exp_avgs), sub(exp_avg_sqs)
        p32, m32, v32 = _decay_and_moments(P, sub(grads), M, V, lr=lr, beta1=beta1, beta2=beta2,
                                           weight_decay=weight_decay, maximize=maximize)
        if lr != 0.0:
            denom = torch._foreach_sqrt(v32)
            torch._foreach_div_(denom, math.sqrt(1.0 - beta2 ** t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p32, m32, denom, -lr / (1.0 - beta1 ** t))
        _copy_back(P, p32)
        _copy_back(M, m32)
        _copy_back(V, v32)
    bump_host_counts(steps)


def _as_fp32(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _decay_and_moments(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, weight_decay, maximize):
    """The first half of an AdamW step on fp32 views (copies for non-fp32 lists): decoupled decay of the params,
    both moments updated. Returns (p32, m32, v32); the caller applies the bias-corrected update and copies back."""
    p32, g32 = _as_fp32(params), _as_fp32(grads)
    m32, v32 = _as_fp32(exp_avgs), _as_fp32(exp_avg_sqs)
    if maximize:
        g32 = torch._foreach_neg(g32)
    if weight_decay != 0.0:
        torch._foreach_mul_(p32, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(m32, g32, 1.0 - beta1)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, g32, g32, 1.0 - beta2)
    return p32, m32, v32


def _copy_back(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def _adamw_dense(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                 maximize=False) -> None:
    """AdamW on dense tensors with 0-dim fp32 step counts (``other_params``: few, small tensors), unchunked."""
    torch._foreach_add_(steps, 1.0)
    p32, m32, v32 = _decay_and_moments(params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2,
                                       weight_decay=weight_decay, maximize=maximize)
    if lr != 0.0:
        bc1 = torch._foreach_pow(beta1, steps)  # beta1^t
        bc2 = torch._foreach_pow(beta2, steps)
        torch._foreach_sub_(bc1, 1.0)  # -(1 - beta1^t)
        torch._foreach_div_(bc1, lr)
        torch._foreach_reciprocal_(bc1)  # -lr / (1 - beta1^t): the (negative) step size
        torch._foreach_sub_(bc2, 1.0)
        torch._foreach_neg_(bc2)
        torch._foreach_sqrt_(bc2)  # sqrt(1 - beta2^t)
        denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, bc1)
        torch._foreach_addcdiv_(p32, m32, denom)
    _copy_back(params, p32)
    _copy_back(exp_avgs, m32)
    _copy_back(exp_avg_sqs, v32)


# ------------------------------------------------------------------------------------------------ base class
def _check_float(name, value, lo=0.0, hi=None, hi_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < lo or (hi is not None and (value >= hi if hi_open else value > hi)):
        rng = f"[{lo}, {hi})" if hi is not None and hi_open else (f"[{lo}, {hi}]" if hi is not None else f">= {lo}")
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def _check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    return (_check_float("betas[0]", betas[0], 0.0, 1.0), _check_float("betas[1]", betas[1], 0.0, 1.0))


class SparseOptimizerBase(torch.optim.Optimizer):
    """Shared machinery of :class:`SparseAdamW` and :class:`spiel.optim.SM3`.

    Param groups: group 0 holds the ``values`` of every sparse layer (``group["sparse"] is True``); the
    following groups (``group["sparse"] is False``) hold ``other_params`` (dense trainable tensors, e.g. a
    classifier head), updated with plain AdamW. torch LR schedulers work on all groups as usual.

    Subclasses define ``_slot_state`` (per-slot state keys -> value given to regrown slots) and ``_init_state``.
    """

    _slot_state: Dict[str, float] = {}

    def __init__(self, model, sparse_defaults: dict, other_params, other_defaults: dict,
                 step_in_backward: bool = False):
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward must be a bool, got {type(step_in_backward).__name__}")
        layers = sparse_layers(model)
        params, layer_of = [], {}
        for _, layer in layers:
            p = layer.values
            if id(p) in layer_of:
                continue
            layer_of[id(p)] = layer
            params.append(p)
        groups = [dict(params=params, sparse=True, **sparse_defaults)]
        groups += self._other_groups(other_params, other_defaults, {id(p) for p in params})
        defaults = dict(sparse_defaults)
        for key, value in other_defaults.items():
            defaults.setdefault(key, value)
        defaults["sparse"] = False
        if not params and len(groups) == 1:
            raise ValueError("no SparseDeltaLinear layers found and no other_params given: nothing to optimize")
        super().__init__(groups, defaults)
        self._layer_of: Dict[int, nn.Module] = layer_of
        self.layer_names = [n for n, _ in layers]
        for p in params:
            self._init_state(p, layer_of[id(p)], self.param_groups[0])
        self.step_in_backward = step_in_backward
        self._backward_hooks = []
        self._ready: List[torch.Tensor] = []  # step_in_backward: params whose gradient is complete, not yet stepped
        self._ready_numel = 0
        if step_in_backward:
            for p in params:
                self._backward_hooks.append(p.register_post_accumulate_grad_hook(self._step_in_backward_hook))

    #: ``step_in_backward``: the layers whose gradients are complete are updated together once they hold this many
    #: deltas (and at the end of each backward): a few fused launches per backward instead of one per layer (the
    #: per-call host cost), for at most this many gradient elements alive beyond the current layer's.
    BACKWARD_FLUSH_NUMEL = 2 ** 24

    def _step_in_backward_hook(self, param) -> None:
        """``step_in_backward``: queue ``param`` (its gradient is complete); update the queued layers once they
        hold :attr:`BACKWARD_FLUSH_NUMEL` deltas, and the rest when the backward ends (an autograd engine
        callback), freeing their gradients."""
        if param.grad is None:
            return
        if not self._ready:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_ready)
        self._ready.append(param)
        self._ready_numel += param.numel()
        if self._ready_numel >= self.BACKWARD_FLUSH_NUMEL:
            self._flush_ready()

    @torch.no_grad()
    def _flush_ready(self) -> None:
        params = [p for p in self._ready if p.grad is not None]
        self._ready, self._ready_numel = [], 0
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("spiel optimizers do not support sparse gradients")
        for group in self.param_groups:
            if group["sparse"]:  # group 0: the hooked params are its params
                self._step_sparse(group, params, [p.grad for p in params], [self.state[p] for p in params])
                break
        for p in params:
            p.grad = None

    def remove_backward_hooks(self) -> None:
        """Stop stepping in backward (``step_in_backward=True``): from now on :meth:`step` updates the sparse
        values from their accumulated gradients, as without the option."""
        for handle in self._backward_hooks:
            handle.remove()
        self._backward_hooks = []
        self._flush_ready()
        self.step_in_backward = False

    @staticmethod
    def _other_groups(other_params, other_defaults, sparse_ids) -> List[dict]:
        if other_params is None:
            return []
        if isinstance(other_params, torch.Tensor):
            other_params = [other_params]
        other_params = list(other_params)
        if not other_params:
            return []
        if all(isinstance(g, dict) for g in other_params):
            raw = other_params
        elif any(isinstance(g, dict) for g in other_params):
            raise TypeError("other_params must be all tensors or all param-group dicts")
        else:
            raw = [{"params": other_params}]
        groups = []
        for g in raw:
            g = dict(g)
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            for p in ps:
                if id(p) in sparse_ids:
                    raise ValueError("other_params contains the values of a sparse layer (they are optimized already)")
            g["params"] = ps
            g.pop("sparse", None)
            for key, value in other_defaults.items():
                g.setdefault(key, value)
            g["betas"] = _check_betas(g["betas"])
            g["sparse"] = False
            groups.append(g)
        return groups

    # -- hooks for subclasses
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["sparse"]:
                self._step_sparse(group, *_gather_sparse(self, group))
            else:
                self._step_dense(group)
        return loss

    @abc.abstractmethod
    def _step_sparse(self, group, params, grads, states) -> None:
        """Update the sparse layers' values of ``group`` (params with a gradient, their grads and states)."""

    @abc.abstractmethod
    def _init_state(self, param, layer, group) -> None:
        """Create the per-layer state of ``param`` (SparseAdamW: moments and steps; SM3: accumulators)."""

    # -- public helpers
    def layer_of(self, param) -> Optional[nn.Module]:
        return self._layer_of.get(id(param))

    @property
    def layers(self) -> List[nn.Module]:
        return [self._layer_of[id(p)] for p in self.param_groups[0]["params"]]

    @torch.no_grad()
    def reindex(self, layer, order: torch.Tensor, regrown: torch.Tensor,
                seed: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Permute the per-slot state of ``layer`` after an index update.

        Args:
            layer: the SparseDeltaLinear (or its ``values`` Parameter).
            order: int64 [k_new]: new slot i takes the state of old slot ``order[i]`` (ignored where regrown).
            regrown: bool [k_new]: slots that hold a new index; their state is reseeded (``seed[key]`` gives
                the values for these slots in ascending slot order, default: the optimizer's fresh state, i.e.
                zero moments and a zero per-slot step count). Old slots not referenced by ``order`` (dropped) are
                discarded. Row/column statistics (SM3 accumulators) are per position, not per slot: kept.
        No host sync.
        """
        param = layer.values if isinstance(layer, nn.Module) else layer
        state = self.state.get(param)
        if not state:
            return
        order = order.to(device=param.device, dtype=torch.int64)
        regrown = regrown.to(device=param.device, dtype=torch.bool)
        src = order.clamp(min=0)
        seed = seed or {}
        for key, fill in self._slot_state.items():
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                continue
            new = t.index_select(0, src) if src.numel() else t.new_empty(0)
            if key in seed:
                sv = seed[key].to(device=new.device)
                if not new.is_floating_point():  # compact integer step counts: saturate, never wrap
                    sv = sv.clamp(0, step_limit(new.dtype))
                new.masked_scatter_(regrown, sv.to(dtype=new.dtype))
            else:
                new.masked_fill_(regrown, fill)
            state[key] = new

    @torch.no_grad()
    def reindex_many(self, layers: Sequence, order: torch.Tensor, regrown: torch.Tensor) -> None:
        """:meth:`reindex` (without seeds) of many layers after one index update: row i of ``order`` (int64) and
        ``regrown`` (bool), both [L, k], is for ``layers[i]``.

        Per state kind and dtype, the layers' per-slot tensors are stacked, gathered by ``order``, reset at the
        regrown slots and written back into the same tensors by one foreach copy: a fixed number of launches
        whatever L, and the same values as :meth:`reindex` per layer. A state tensor not of k elements on
        ``order``'s device, or one shared by two layers, is reindexed as :meth:`reindex` does (a new tensor);
        a subclass that overrides :meth:`reindex` gets it called per layer. No host sync.
        """
        if order.dim() != 2 or order.shape != regrown.shape or order.shape[0] != len(layers):
            raise ValueError(f"reindex_many: order and regrown must be [len(layers)={len(layers)}, k], got "
                             f"{tuple(order.shape)} and {tuple(regrown.shape)}")
        if type(self).reindex is not SparseOptimizerBase.reindex:
            for layer, o, r in zip(layers, order.unbind(0), regrown.unbind(0)):
                self.reindex(layer, o, r)
            return
        params = [layer.values if isinstance(layer, nn.Module) else layer for layer in layers]
        states = [self.state.get(p) for p in params]
        if not any(states):
            return
        k = order.shape[1]
        src = order.to(torch.int64).clamp(min=0)
        regrown = regrown.to(torch.bool)
        rows_of = functools.cache(lambda t: t.unbind(0))  # src / regrown in rows: once, where a subset needs them
        for key, fill in self._slot_state.items():
            by_dtype: Dict[torch.dtype, list] = defaultdict(list)  # dtype -> [(row, state tensor)]
            for row, state in enumerate(states):
                t = state.get(key) if state else None
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    by_dtype[t.dtype].append((row, t))
            for items in by_dtype.values():
                aliased = len({id(t) for _, t in items}) < len(items)  # in place, one would overwrite the other
                stacked = []
                for row, t in items:
                    if not aliased and t.shape[0] == k and t.device == src.device:
                        stacked.append((row, t))
                    else:  # the per-layer rule: a new tensor
                        o, g = rows_of(src)[row].to(t.device), rows_of(regrown)[row].to(t.device)
                        new = t.index_select(0, o) if o.numel() else t.new_empty(0)
                        states[row][key] = new.masked_fill_(g, fill)
                if not stacked:
                    continue
                if len(stacked) == len(states):
                    idx, fresh = src, regrown
                else:
                    idx = torch.stack([rows_of(src)[row] for row, _ in stacked])
                    fresh = torch.stack([rows_of(regrown)[row] for row, _ in stacked])
                targets = [t for _, t in stacked]
                new = torch.stack(targets).gather(1, idx).masked_fill_(fresh, fill)
                torch._foreach_copy_(targets, list(new.unbind(0)))

    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict`` but keeps every state tensor's saved dtype (torch
        would cast fp32 moments to the dtype of bf16 values, and bf16 moments to fp32)."""
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}")
        for g, sg in zip(groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of the "
                                 "optimizer's group (different model or layer set?)")
        id_map = {old: p for g, sg in zip(groups, saved_groups) for old, p in zip(sg["params"], g["params"])}
        state = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                continue
            p = id_map[key]
            state[p] = {k: (v.to(device=p.device) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                        for k, v in value.items()}
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = copy.deepcopy({k: v for k, v in sg.items() if k != "params"})
            ng["params"] = g["params"]
            new_groups.append(ng)
        self.__setstate__({"state": state, "param_groups": new_groups})

    # -- dense params: AdamW
    def _step_dense(self, group) -> None:
        params, grads, ms, vs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("spiel optimizers do not support sparse gradients")
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        beta1, beta2 = group["betas"]
        # dense tensors have different shapes than their 0-dim steps: one foreach call per tensor keeps the
        # math identical to the sparse path (few dense tensors: a classifier head)
        for i in range(len(params)):
            _adamw_dense(params[i:i + 1], grads[i:i + 1], ms[i:i + 1], vs[i:i + 1], steps[i:i + 1],
                         lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], maximize=group.get("maximize", False))


def _gather_sparse(optimizer, group):
    """(params, grads, states) of the sparse group's params that have a gradient."""
    params, grads, states = [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("spiel optimizers do not support sparse gradients")
        params.append(p)
        grads.append(p.grad)
        states.append(optimizer.state[p])
    return params, grads, states


# ------------------------------------------------------------------------------------------------ SparseAdamW
class SparseAdamW(SparseOptimizerBase):
    """AdamW over the sparse deltas (``values``) of every SparseDeltaLinear of ``model``.

    Args:
        model: an ``nn.Module`` (its SparseDeltaLinear layers are found recursively) or an iterable of layers.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=0.0). Weight decay is decoupled and pulls the deltas toward 0, i.e. the fine-tuned
            weight toward the pretrained one.
        state_dtype: dtype of the moments ``exp_avg``/``exp_avg_sq`` (fp32 default; bf16 halves the state
            memory; the math runs in fp32 either way).
        other_params: optional dense trainable tensors (or param-group dicts) such as a classifier head,
            updated with plain AdamW (same hyperparameters unless the dict overrides them; fp32-like state in
            the parameter's dtype, one fp32 step count per tensor).
        group_numel: most deltas updated by one sequence of launches (default :data:`GROUP_NUMEL`, read at each
            step); bounds the step's temporaries (unfused path only).
        fused: run the sparse update as :func:`spiel.ops.adamw_step_` (one launch per dtype combination: every
            tensor read and written once, no temporaries) instead of grouped ``torch._foreach_*`` chains.
            None (default): fused on CUDA tensors when the op's selected backend there is a kernel (Triton or
            CUDA), unfused otherwise (CPU). True: always the op (on CPU its reference backend). False: never.
        per_slot_steps: True (default): a step count per slot (below). False: one count per layer, as
            ``torch.optim.AdamW`` keeps it (a 0-dim fp32 CPU tensor, incremented on the host: no device memory,
            -2 B per delta); a regrown slot then gets zero moments but the layer's bias correction (what
            resetting a slot's state under torch's AdamW gives), so its first updates are larger (up to
            ``lr * (1 - beta1) / sqrt(1 - beta2)``, 3.2 ``lr`` with the default betas) than with a fresh count.
        step_in_backward: update each layer's values inside backward, as soon as their gradient is accumulated
            (``Tensor.register_post_accumulate_grad_hook``), and free that gradient at once: the values'
            gradients (4 B per fp32 delta) are never all alive together, so the peak drops by up to their total.
            :meth:`step` then only updates ``other_params``. Every backward is a step, with the gradient of that
            backward alone: no gradient accumulation over micro-batches, no clipping by the global norm, no
            GradScaler unscaling and no DDP all-reduce before the update (single process, or gradients that need
            none); a training loop's clipping (e.g. the transformers Trainer's ``max_grad_norm``) then sees no
            gradient of the deltas. :meth:`remove_backward_hooks` turns it off.

    State per sparse layer (O(k)): ``exp_avg`` [k], ``exp_avg_sq`` [k] (``state_dtype``) and ``step`` [k]: a step
    count PER SLOT, so an index regrown by the scheduler restarts Adam's bias correction on its own (regrown
    slots get zero moments and step 0; see :meth:`reindex`). ``step`` is int16, saturating at 32767 (exact: the
    fp32 bias corrections are 1 from there on for betas <= 0.99947), or int32 for betas closer to 1 (exact up
    to 2**24 steps, as fp32 counts were); checkpoints with fp32 per-slot steps load (converted).

    Bytes per delta: persistent 10 (fp32 moments, int16 step; 6 with bf16 moments; 2 less without per-slot
    steps), beside the layer's values,
    grad and index. Transient at the step: two fp32 buffers of one group (8 B x ``group_numel``), plus one per
    list that is not fp32 (bf16 values: 12; bf16 values and moments: 16 B x ``group_numel``). The update runs
    as ~20 launches per group of at most ``group_numel`` deltas (layers are packed into groups in order, a
    large layer spans several), with no host sync; fused (default on CUDA), as one launch with no temporaries.
    """

    _slot_state = {"exp_avg": 0.0, "exp_avg_sq": 0.0, "step": 0}

    def __init__(self, model, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, state_dtype: torch.dtype = torch.float32, maximize: bool = False,
                 other_params=None, group_numel: Optional[int] = None, fused: Optional[bool] = None,
                 per_slot_steps: bool = True, step_in_backward: bool = False):
        lr = _check_float("lr", lr)
        eps = _check_float("eps", eps)
        weight_decay = _check_float("weight_decay", weight_decay)
        betas = _check_betas(betas)
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"state_dtype must be float32, bfloat16 or float16, got {state_dtype}")
        if group_numel is not None:
            resolve_group_numel(group_numel)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None or a bool, got {type(fused).__name__}")
        if not isinstance(per_slot_steps, bool):
            raise TypeError(f"per_slot_steps must be a bool, got {type(per_slot_steps).__name__}")
        self.fused = fused
        self.per_slot_steps = per_slot_steps
        self.state_dtype = state_dtype
        self.group_numel = group_numel
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=bool(maximize))
        super().__init__(model, hyper, other_params, dict(hyper), step_in_backward)

    def _new_step(self, param, group) -> torch.Tensor:
        if self.per_slot_steps:
            return torch.zeros(param.shape, dtype=step_dtype_for(group["betas"]), device=param.device)
        return torch.zeros((), dtype=torch.float32)  # one host count (CPU): no device memory, no sync

    def _step_fits(self, step, param) -> bool:
        if not isinstance(step, torch.Tensor):
            return False
        return step.shape == param.shape if self.per_slot_steps else is_host_count(step)

    def _init_state(self, param, layer, group) -> None:
        st = self.state[param]
        if not st:
            st["step"] = self._new_step(param, group)
            st["exp_avg"] = torch.zeros(param.shape, dtype=self.state_dtype, device=param.device)
            st["exp_avg_sq"] = torch.zeros(param.shape, dtype=self.state_dtype, device=param.device)

    def _convert_step(self, st: dict, param, group) -> None:
        """A ``step`` of the other kind (a checkpoint saved with the other ``per_slot_steps``): per-slot counts
        become one host count, their largest (one device read, at the first step after loading); a host count
        becomes per-slot counts all equal to it."""
        step = st.get("step")
        if not isinstance(step, torch.Tensor):
            st["step"] = self._new_step(param, group)
        elif self.per_slot_steps:
            count = step.detach().reshape(-1)[:1].cpu().float() if step.numel() else torch.zeros(1)
            new = self._new_step(param, group)
            st["step"] = new.fill_(min(float(count[0]), step_limit(new.dtype)))
        else:
            count = float(step.max()) if step.numel() else 0.0
            st["step"] = torch.tensor(min(count, float(step_limit(torch.float32))), dtype=torch.float32)

    @staticmethod
    def _compact_step(st: dict, betas) -> None:
        """Store ``st["step"]`` in the compact dtype for ``betas`` (fp32 per-slot steps of older checkpoints,
        int16 counts after the betas moved closer to 1); no host sync."""
        step = st.get("step")
        if not isinstance(step, torch.Tensor) or step.dim() == 0:
            return
        want = step_dtype_for(betas)
        if step.dtype == want or (want == torch.int16 and step.dtype == torch.int32):
            return  # int32 counts are exact for any betas
        limit = step_limit(want)
        if step.is_floating_point():
            step = step.round().clamp(0, limit)
        else:
            step = step.clamp(0, limit) if torch.iinfo(step.dtype).max > limit else step.clamp(min=0)
        st["step"] = step.to(want)

    def _step_sparse(self, group, params, grads, states) -> None:
        for p, st in zip(params, states):
            if not st or st["exp_avg"].shape != p.shape:
                st.clear()
                self._init_state(p, self._layer_of.get(id(p)), group)
            elif not self._step_fits(st["step"], p):
                self._convert_step(st, p, group)
            else:
                self._compact_step(st, group["betas"])
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], maximize=group.get("maximize", False))
        buckets: Dict[tuple, List[int]] = defaultdict(list)
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            buckets[(p.device, p.dtype, g.dtype, st["exp_avg"].dtype, st["exp_avg_sq"].dtype,
                     st["step"].dtype)].append(i)
        for (device, p_dtype, g_dtype, m_dtype, v_dtype, _), sel in buckets.items():
            lists = ([params[i] for i in sel], [grads[i] for i in sel], [states[i]["exp_avg"] for i in sel],
                     [states[i]["exp_avg_sq"] for i in sel], [states[i]["step"] for i in sel])
            if self._use_fused(device) and p_dtype == g_dtype and m_dtype == v_dtype:
                self._fused_step(lists, hyper)
            else:
                adamw_foreach(*lists, group_numel=self.group_numel, **hyper)

    @staticmethod
    def _fused_step(lists, hyper) -> None:
        """The fused op on lists this optimizer built: the states are its own (shapes and dtypes fixed at
        init/reindex), so only what autograd hands in is checked (gradients contiguous, shaped like the values)
        and the op's per-tensor argument checks are skipped (they cost ~1 ms of host per 200 tensors)."""
        params, grads = lists[0], lists[1]
        for i, (p, g) in enumerate(zip(params, grads)):
            if g.shape != p.shape:
                raise ValueError(f"gradient of sparse values {i} has shape {tuple(g.shape)}, values {tuple(p.shape)}")
            if not g.is_contiguous():
                grads[i] = g.contiguous()
        if params and params[0].dtype in ADAMW_PARAM_DTYPES:
            adamw_step_eager(*lists, **hyper)
        else:
            ops.adamw_step_(*lists, **hyper)  # raises the op's clear error for an unsupported dtype

    def _use_fused(self, device: torch.device) -> bool:
        if self.fused is not None:
            return self.fused
        return device.type == "cuda" and _dispatch.select("adamw_step", device)[0] != "torch"

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`SparseOptimizerBase.load_state_dict`; per-slot fp32 ``step`` tensors (checkpoints of older
        versions) are converted to the compact integer counts."""
        super().load_state_dict(state_dict)
        group = self.param_groups[0]
        for p in group["params"]:
            st = self.state.get(p)
            if st:
                if not self._step_fits(st.get("step"), p):
                    self._convert_step(st, p, group)
                self._compact_step(st, group["betas"])
