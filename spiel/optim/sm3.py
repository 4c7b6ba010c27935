"""``SM3`` over the sparse deltas of :class:`spiel.nn.SparseDeltaLinear` layers (Anil et al. 2019, SM3-II
with row and column covers), the optimizer of SpIEL-MA: its row/column accumulators are the statistics from
which :class:`spiel.scheduler.SpielScheduler` regrows indices in ``mode="ma"``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import torch

from .adamw import SparseOptimizerBase, _check_betas, _check_float, layer_shape

__all__ = ["SM3"]


class SM3(SparseOptimizerBase):
    """SM3 over the sparse deltas of every SparseDeltaLinear of ``model``; memory O(out + in + k) per layer.

    For each layer with active flat indices ``j = r * in + c`` and gradient ``g`` at them, one step is::

        nu[j]  = min(row[r], col[c]) + g[j]^2                    (for the active entries only)
        row[r] = max(row[r], max over active j in row r of nu[j])  (scatter_reduce amax, include_self)
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

    State per layer: ``row`` [out] and ``col`` [in] fp32, plus ``momentum_buffer`` [k] fp32 when momentum > 0.
    All layers are updated together (one concatenated buffer: a fixed number of launches per step whatever the
    number of layers), no host sync.
    """

    _slot_state = {"momentum_buffer": 0.0}

    def __init__(self, model, lr: float = 0.1, momentum: float = 0.0, eps: float = 1e-8, weight_decay: float = 0.0,
                 *, other_params=None, other_betas: Tuple[float, float] = (0.9, 0.999), other_eps: float = 1e-8,
                 other_weight_decay: float = 0.0):
        lr = _check_float("lr", lr)
        momentum = _check_float("momentum", momentum, 0.0, 1.0)
        eps = _check_float("eps", eps)
        weight_decay = _check_float("weight_decay", weight_decay)
        sparse = dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay)
        other = dict(lr=lr, betas=_check_betas(other_betas), eps=_check_float("other_eps", other_eps),
                     weight_decay=_check_float("other_weight_decay", other_weight_decay), maximize=False)
        self._consts_key = None
        self._consts = None
        super().__init__(model, sparse, other_params, other)

    def _init_state(self, param, layer, group) -> None:
        st = self.state[param]
        out_f, in_f = layer_shape(layer)
        if "row" not in st or st["row"].shape != (out_f,):
            st["row"] = torch.zeros(out_f, dtype=torch.float32, device=param.device)
        if "col" not in st or st["col"].shape != (in_f,):
            st["col"] = torch.zeros(in_f, dtype=torch.float32, device=param.device)
        if group["momentum"] > 0 and ("momentum_buffer" not in st or st["momentum_buffer"].shape != param.shape):
            st["momentum_buffer"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def accumulators(self, layer) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row [out], col [in]) fp32 accumulators of ``layer`` (SpIEL-MA's regrowth statistics)."""
        param = layer.values
        st = self.state[param]
        if "row" not in st:
            self._init_state(param, layer, self.param_groups[0])
        return st["row"], st["col"]

    def _constants(self, params, layers, device):
        """Per-slot in_features and row/col offsets into the concatenated accumulators (cached: they only change
        when the set of layers with a gradient or their k changes)."""
        key = (device, tuple((id(p), p.numel()) for p in params))
        if key != self._consts_key:
            ks = [p.numel() for p in params]
            shapes = [layer_shape(layer) for layer in layers]
            outs = [s[0] for s in shapes]
            ins = [s[1] for s in shapes]
            counts = torch.tensor(ks, dtype=torch.int64)
            row_off = torch.tensor([0] + outs[:-1], dtype=torch.int64).cumsum(0)
            col_off = torch.tensor([0] + ins[:-1], dtype=torch.int64).cumsum(0)
            in_slot = torch.repeat_interleave(torch.tensor(ins, dtype=torch.int64), counts).to(device)
            row_slot = torch.repeat_interleave(row_off, counts).to(device)
            col_slot = torch.repeat_interleave(col_off, counts).to(device)
            self._consts = (in_slot, row_slot, col_slot, ks, outs, ins)
            self._consts_key = key
        return self._consts

    def _step_sparse(self, group, params, grads, states) -> None:
        by_device: Dict[torch.device, List[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_device[p.device].append(i)
        for device, sel in by_device.items():
            ps = [params[i] for i in sel]
            layers = [self._layer_of[id(p)] for p in ps]
            for p, layer in zip(ps, layers):
                self._init_state(p, layer, group)
            self._step_device(group, ps, [grads[i] for i in sel], [states[i] for i in sel], layers, device)

    def _step_device(self, group, params, grads, states, layers, device) -> None:
        if sum(p.numel() for p in params) == 0:
            return
        lr, momentum, eps, wd = float(group["lr"]), group["momentum"], group["eps"], group["weight_decay"]
        in_slot, row_slot, col_slot, ks, outs, ins = self._constants(params, layers, device)
        idx = torch.cat([layer.indices for layer in layers]).long()
        r = torch.div(idx, in_slot, rounding_mode="floor")
        c = idx - r * in_slot
        r += row_slot
        c += col_slot
        g = torch.cat(grads).float()  # a new tensor (cat copies): the .grad tensors are never modified
        rows = [st["row"] for st in states]
        cols = [st["col"] for st in states]
        row_acc = torch.cat(rows)
        col_acc = torch.cat(cols)
        nu = torch.minimum(row_acc.index_select(0, r), col_acc.index_select(0, c)).addcmul_(g, g)
        row_acc.scatter_reduce_(0, r, nu, "amax", include_self=True)
        col_acc.scatter_reduce_(0, c, nu, "amax", include_self=True)
        torch._foreach_copy_(rows, list(row_acc.split(outs)))
        torch._foreach_copy_(cols, list(col_acc.split(ins)))
        update = g.div_(nu.sqrt_().add_(eps))
        if momentum > 0:
            bufs = [st["momentum_buffer"] for st in states]
            mom = torch.cat(bufs)
            mom.mul_(momentum).add_(update, alpha=1.0 - momentum)
            torch._foreach_copy_(bufs, list(mom.split(ks)))
            update = mom
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, list(update.split(ks)), alpha=-lr)
