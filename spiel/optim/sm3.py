"""``SM3`` over the sparse deltas of :class:`spiel.nn.SparseDeltaLinear` layers (Anil et al. 2019, SM3-II
with row and column covers), the optimizer of SpIEL-MA: its row/column accumulators are the statistics from
which :class:`spiel.scheduler.SpielScheduler` regrows indices in ``mode="ma"``.
"""
from __future__ import annotations

import collections
import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from .adamw import (SparseOptimizerBase, _check_betas, _check_float, _fp32_copy, _segment_groups, _slices,
                    layer_shape, resolve_group_numel)

__all__ = ["SM3"]

_INT32_MAX = 2 ** 31 - 1
_PLAN_CACHE_SIZE = 16


def _to_device(values: List[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a host sync (pinned, non-blocking copy on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class SM3(SparseOptimizerBase):
    """SM3 over the sparse deltas of every SparseDeltaLinear of ``model``; memory O(out + in + k) per layer.

    For each layer with active flat indices ``j = r * in + c`` and gradient ``g`` at them, one step is::

        nu[j]  = min(row[r], col[c]) + g[j]^2                    (for the active entries only)
        row[r] = max(row[r], max over active j in row r of nu[j])  (scatter amax, include_self)
        col[c] = max(col[c], max over active j in col c of nu[j])
        u[j]   = g[j] / (sqrt(nu[j]) + eps)
        m[j]   = momentum * m[j] + (1 - momentum) * u[j]         (only when momentum > 0; else m = u)
        value[j] -= lr * m[j]     (after the decoupled decay value *= 1 - lr * weight_decay, if any)

    With a fixed index set this is exactly SM3-II (the old accumulator never exceeds the new maximum then);
    keeping the old value (``include_self``) makes the accumulators monotone across index updates, so rows and
    columns keep their history when their entries are dropped -- which SpIEL-MA relies on to rank positions by
    ``outer(row, col)``.

    Args:
        model: an ``nn.Module`` (SparseDeltaLinear layers found recursively) or an iterable of layers.
        lr: learning rate (default 0.1, as SM3's reference implementations; tune it).
        momentum: in [0, 1); > 0 adds a per-slot momentum buffer (O(k) more memory).
        eps: added to ``sqrt(nu)``.
        weight_decay: decoupled decay of the deltas toward 0 (default 0).
        other_params: optional dense trainable tensors or param-group dicts (e.g. a classifier head), updated with
            plain AdamW (``other_betas``, ``other_eps``, ``other_weight_decay``, learning rate ``lr`` unless a dict
            overrides it).
        group_numel: most deltas updated by one sequence of launches (default
            :data:`spiel.optim.adamw.GROUP_NUMEL`, read at each step); bounds the step's temporaries.
        step_in_backward: update each layer inside backward as soon as its gradient is accumulated, and free
            the gradient (as :class:`spiel.optim.SparseAdamW`'s option: no gradient accumulation, clipping,
            GradScaler or DDP all-reduce before the update).

    State per layer: ``row`` [out] and ``col`` [in] fp32 -- views into one flat fp32 buffer per device holding
    the accumulators of all layers (grouped by layer shape), so the update gathers from and scatters into it
    directly -- plus ``momentum_buffer`` [k] fp32 when momentum > 0. A checkpoint's ``row``/``col`` tensors
    (or ones assigned into ``state``) are copied into the buffer at the next use.

    Bytes per delta: persistent 0 (O(out + in) per layer) without momentum, 4 with it, beside the layer's
    values, grad and index. Transient at the step: 16 B x ``group_numel`` (int32 row/column positions when
    out * in < 2**31, the gathered accumulators, an fp32 copy of the grads), whatever the values' dtype. Layers
    are processed in groups of at most ``group_numel`` deltas of one shape (a large layer spans several; the
    later groups then read a snapshot of the accumulators, so every nu uses the pre-step values): ~25 launches
    per group whatever the number of layers, no host sync (a group's few offsets are uploaded, without a sync,
    when the set of layers with a gradient changes).
    """

    _slot_state = {"momentum_buffer": 0.0}

    def __init__(self, model, lr: float = 0.1, momentum: float = 0.0, eps: float = 1e-8, weight_decay: float = 0.0,
                 *, other_params=None, other_betas: Tuple[float, float] = (0.9, 0.999), other_eps: float = 1e-8,
                 other_weight_decay: float = 0.0, group_numel: Optional[int] = None, step_in_backward: bool = False):
        lr = _check_float("lr", lr)
        momentum = _check_float("momentum", momentum, 0.0, 1.0)
        eps = _check_float("eps", eps)
        weight_decay = _check_float("weight_decay", weight_decay)
        if group_numel is not None:
            resolve_group_numel(group_numel)
        sparse = dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay)
        other = dict(lr=lr, betas=_check_betas(other_betas), eps=_check_float("other_eps", other_eps),
                     weight_decay=_check_float("other_weight_decay", other_weight_decay), maximize=False)
        self.group_numel = group_numel
        self._acc_key = None      # (id, device) of the sparse params the accumulator layout was built for
        self._acc_version = 0
        self._acc_bufs: Dict[torch.device, torch.Tensor] = {}  # device -> flat fp32 accumulators
        self._acc_slots: Dict[int, tuple] = {}  # id(param) -> (row offset, col offset, row view, col view)
        # plans by key (the set of layers stepped together: every layer in step(), a few subsets with
        # step_in_backward); a handful of entries, least recently used dropped
        self._plans: "collections.OrderedDict[tuple, Tuple[List[dict], set]]" = collections.OrderedDict()
        self._plan_split: set = set()
        super().__init__(model, sparse, other_params, other, step_in_backward)

    # -- accumulators: one flat fp32 buffer per device, each layer's row/col a view into it
    def _ensure_accumulators(self) -> None:
        params = self.param_groups[0]["params"]
        key = tuple((id(p), p.device) for p in params)
        if key != self._acc_key:
            self._build_accumulators(params)
            self._acc_key = key
            self._acc_version += 1
            return
        for p in params:  # state replaced (load_state_dict, assignment): copy it into the buffer
            slot = self._acc_slots[id(p)]
            st = self.state[p]
            if st.get("row") is not slot[2] or st.get("col") is not slot[3]:
                self._attach(st, slot)

    def _build_accumulators(self, params) -> None:
        """Lay out the accumulators: per device, per layer shape, the rows of all its layers then their columns
        (existing values are carried over)."""
        by_dev: Dict[torch.device, Dict[Tuple[int, int], list]] = {}
        for p in params:
            shape = layer_shape(self._layer_of[id(p)])
            by_dev.setdefault(p.device, {}).setdefault(shape, []).append(p)
        bufs, slots = {}, {}
        for dev, classes in by_dev.items():
            total = sum(len(ps) * (o + i) for (o, i), ps in classes.items())
            buf = torch.zeros(total, dtype=torch.float32, device=dev)
            off = 0
            for (o, i), ps in classes.items():
                row0, col0 = off, off + len(ps) * o
                off = col0 + len(ps) * i
                for j, p in enumerate(ps):
                    r, c = row0 + j * o, col0 + j * i
                    slots[id(p)] = (r, c, buf.narrow(0, r, o), buf.narrow(0, c, i))
            bufs[dev] = buf
        self._acc_bufs, self._acc_slots = bufs, slots
        for p in params:
            self._attach(self.state[p], slots[id(p)])

    @staticmethod
    def _attach(st: dict, slot: tuple) -> None:
        for key, view in (("row", slot[2]), ("col", slot[3])):
            old = st.get(key)
            if old is view:
                continue
            if isinstance(old, torch.Tensor):
                if old.shape == view.shape:
                    view.copy_(old)
                else:
                    view.zero_()
            st[key] = view

    def _init_state(self, param, layer, group) -> None:
        slot = self._acc_slots.get(id(param))
        if slot is None or slot[2].device != param.device:
            self._ensure_accumulators()
        else:
            self._attach(self.state[param], slot)
        st = self.state[param]
        if group["momentum"] > 0 and ("momentum_buffer" not in st or st["momentum_buffer"].shape != param.shape):
            st["momentum_buffer"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def accumulators(self, layer) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row [out], col [in]) fp32 accumulators of ``layer`` (SpIEL-MA's regrowth statistics): views into the
        optimizer's flat buffer, updated in place by :meth:`step`. ValueError for a layer it does not optimize."""
        return self.accumulators_many([layer])[0]

    def accumulators_many(self, layers) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`accumulators` of every layer of ``layers``, with the buffer layout checked once (it walks every
        parameter: once per layer it cost ~0.6 ms each, 140 ms of host per 7B index update)."""
        params = []
        for layer in layers:
            param = getattr(layer, "values", None)
            if param is None or id(param) not in self._layer_of:
                raise ValueError(f"{type(layer).__name__} is not a sparse layer optimized by this SM3")
            params.append(param)
        self._ensure_accumulators()
        return [(self.state[p]["row"], self.state[p]["col"]) for p in params]

    # -- the update
    def _get_plan(self, params, grads) -> List[dict]:
        """Groups of at most ``group_numel`` slots of layers of one shape (and dtypes), with the offsets of each
        slice's accumulators (cached: they change with the set of layers that have a gradient, or their k)."""
        group_numel = resolve_group_numel(self.group_numel)
        layers = [self._layer_of[id(p)] for p in params]
        key = (group_numel, self._acc_version) + tuple(
            (id(p), p.numel(), p.dtype, g.dtype, layer.indices.dtype) for p, g, layer in zip(params, grads, layers))
        hit = self._plans.get(key)
        if hit is not None:
            self._plans.move_to_end(key)
            self._plan_split = hit[1]
            return hit[0]
        buckets: Dict[tuple, List[int]] = defaultdict(list)
        for pos, (p, g, layer) in enumerate(zip(params, grads, layers)):
            if p.numel():
                buckets[(p.device, layer_shape(layer), layer.indices.dtype, p.dtype, g.dtype)].append(pos)
        plan = []
        self._plan_split = set()  # devices with a layer spread over several groups
        for (dev, (out_f, in_f), idx_dtype, _, _), sel in buckets.items():
            small = idx_dtype == torch.int32 and self._acc_bufs[dev].numel() <= _INT32_MAX
            wdt = torch.int32 if small else torch.int64
            groups = _segment_groups([params[q].numel() for q in sel], group_numel)
            if len(groups) > len({q for seg in groups for q, _, _ in seg}):
                self._plan_split.add(dev)
            for seg in groups:
                segs = [(sel[q], start, length) for q, start, length in seg]
                lens = [length for _, _, length in segs]
                rows = [self._acc_slots[id(params[pos])][0] for pos, _, _ in segs]
                cols = [self._acc_slots[id(params[pos])][1] for pos, _, _ in segs]
                entry = dict(device=dev, in_f=in_f, wdt=wdt, segs=segs, lens=lens, n=sum(lens),
                             row0=rows[0], col0=cols[0])
                if len(segs) > 1:  # per-slot offsets = cumsum of the offset steps put at each slice's start
                    starts = [0]
                    for length in lens[:-1]:
                        starts.append(starts[-1] + length)
                    entry["starts"] = _to_device(starts, torch.int64, dev)
                    entry["row_steps"] = _to_device([b - a for a, b in zip([0] + rows, rows)], wdt, dev)
                    entry["col_steps"] = _to_device([b - a for a, b in zip([0] + cols, cols)], wdt, dev)
                plan.append(entry)
        self._plans[key] = (plan, self._plan_split)
        while len(self._plans) > _PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _step_sparse(self, group, params, grads, states) -> None:
        self._ensure_accumulators()
        if group["momentum"] > 0:
            for p, st in zip(params, states):
                mb = st.get("momentum_buffer")
                if not isinstance(mb, torch.Tensor) or mb.shape != p.shape:
                    st["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        plan = self._get_plan(params, grads)
        # nu reads the accumulators as they were before this step: when a layer spans several groups, the later
        # groups read a snapshot (O(out + in) per layer), not what the earlier ones wrote
        snapshots = {dev: self._acc_bufs[dev].clone() for dev in self._plan_split}
        for entry in plan:
            self._step_group(group, entry, params, grads, states, snapshots.get(entry["device"]))

    def _step_group(self, group, e: dict, params, grads, states, before: Optional[torch.Tensor]) -> None:
        lr, momentum, eps, wd = float(group["lr"]), group["momentum"], group["eps"], group["weight_decay"]
        segs, lens, n, in_f, wdt = e["segs"], e["lens"], e["n"], e["in_f"], e["wdt"]
        local = [(j, start, length) for j, (_, start, length) in enumerate(segs)]
        pick = lambda ts: [ts[pos] for pos, _, _ in segs]  # noqa: E731
        ps = pick(params)
        acc = self._acc_bufs[e["device"]]
        # positions into the flat accumulators (int32 arithmetic when everything fits)
        idx = _slices([self._layer_of[id(p)].indices for p in ps], local, "indices", writable=False)
        own = len(idx) > 1 or idx[0].dtype != wdt
        idx = torch.cat(idx) if len(idx) > 1 else idx[0]
        if idx.dtype != wdt:
            idx = idx.to(wdt)
        r = torch.div(idx, in_f, rounding_mode="floor")
        c = idx.sub_(r, alpha=in_f) if own else torch.sub(idx, r, alpha=in_f)
        del idx
        if "starts" not in e:
            r.add_(e["row0"])
            c.add_(e["col0"])
        else:
            z = torch.zeros(n, dtype=wdt, device=acc.device)
            z.index_copy_(0, e["starts"], e["row_steps"]).cumsum_(0)
            r.add_(z)
            z.zero_().index_copy_(0, e["starts"], e["col_steps"]).cumsum_(0)
            c.add_(z)
            del z
        src = acc if before is None else before
        nu = src.index_select(0, r)
        torch.minimum(nu, src.index_select(0, c), out=nu)
        del src
        gs = _slices(pick(grads), local, "grads", writable=False)
        if len(gs) == 1 and gs[0].dtype == torch.float32:
            g, own_g = gs[0], False  # the .grad tensors are never modified
        else:
            g, own_g = _fp32_copy(gs, lens, n)[0], True
        nu.addcmul_(g, g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "index_reduce() is in beta"
            acc.index_reduce_(0, r, nu, "amax", include_self=True)
            acc.index_reduce_(0, c, nu, "amax", include_self=True)
        del r, c
        nu.sqrt_().add_(eps)
        if own_g:
            update, spare = g.div_(nu), nu
        else:
            update, spare = torch.div(g, nu, out=nu), None
        upd = list(update.split(lens))
        if momentum > 0:
            bufs = _slices([states[pos]["momentum_buffer"] for pos, _, _ in segs], local, "momentum_buffer")
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, upd, alpha=1.0 - momentum)
            upd = bufs
        pv = _slices(ps, local, "values")
        if wd != 0.0:
            torch._foreach_mul_(pv, 1.0 - lr * wd)
        if pv[0].dtype == torch.float32:
            torch._foreach_add_(pv, upd, alpha=-lr)
        else:  # bf16/fp16 values: add in fp32, one rounding (as an in-place add of an fp32 update)
            if spare is None:  # (spare: the fp32 buffer the update is not in, free by now)
                _, p32v = _fp32_copy(pv, lens, n)
            else:
                p32v = list(spare.split(lens))
                torch._foreach_copy_(p32v, pv)
            torch._foreach_add_(p32v, upd, alpha=-lr)
            torch._foreach_copy_(pv, p32v)
