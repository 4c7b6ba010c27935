"""``SpielScheduler``: SpIEL's index updates (drop the smallest deltas, regrow new positions) for every
SparseDeltaLinear of a model, in SpIEL-AG (accumulated gradients) or SpIEL-MA (SM3 momentum approximation)
mode.

Timeline (``S = reselection_steps``, ``gamma = accumulation_steps``, update steps ``U = S, 2S, ... < total``),
with ``t`` the number of optimizer steps done; ``step()`` is called once after every optimizer step:

- AG: after step ``U - gamma - 1`` (or at construction) the scheduler sets ``layer.gradient_probe``; in step
  ``U - gamma`` the first backward through each layer calls the probe, which picks the layer's candidates: the
  top ``n_regrow * candidates_per_slot`` positions of ``|dense gradient|`` outside the active indices, streamed
  in row blocks (memory O(k + block)). After step ``U - gamma`` the candidates are installed with
  ``layer.set_candidates``; during steps ``U - gamma + 1 .. U`` (gamma steps, every micro-batch) the layer's
  backward accumulates their gradient in ``candidate_values.grad``, which ``step()`` moves into the scheduler's
  fp32 accumulators (unscaled when a GradScaler is given). After step ``U``: drop + regrow by |accumulated
  gradient|, candidates cleared. With ``candidates_per_slot=1`` there are exactly as many candidates as
  regrown slots, so the accumulation cannot change the choice: the candidates are then *deferred* instead of
  installed (their positions wait in pinned host memory until ``U`` and regrow as they are): the same indices,
  without the window's GPU memory (8 B per candidate) and its sddmm work.
- MA: after step ``U``: drop + regrow the top positions of ``outer(row, col)`` of the SM3 accumulators,
  excluding the active indices (``spiel.ops.topk_outer``, never out x in).

Drop: the ``n = floor(drop_fraction(U) * k)`` active entries of smallest ``|value|`` leave (ties: the larger
position leaves); ``n`` new positions enter with value 0 and fresh optimizer state; indices stay sorted; k is
constant. ``drop_fraction(U)`` decays from ``drop_fraction`` to 0 over ``total_steps`` (linear or cosine).

The update is batched: layers of one device with the same k and n (MA: and shape) are selected, merged and
gathered together with a constant number of launches and no host sync per layer (MA reads one small tensor per
batch); the new indices and values are written into the layers by one foreach copy per dtype
(``spiel.nn.linear.set_indices_many``, the trusted ``set_indices`` for many layers), the optimizer's per-slot state
is permuted per state kind (``reindex_many``), and the sddmm plans of all layers are decided with one host read.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from typing import Dict, Optional

import torch

from ..nn.linear import SparseDeltaLinear, refresh_merged_entries
from ..optim.adamw import layer_shape, sparse_layers
from . import _dist
from ._outer import batched_topk_outer
from ._replace import batches, drop_and_regrow, rebuild_plans, set_candidates_trusted
from ._select import top_abs_rows, top_gradient_entries, union_top

__all__ = ["SpielScheduler", "drop_fraction_at"]

_MODES = ("ag", "ma")
_SCHEDULES = ("linear", "cosine", "constant")


def drop_fraction_at(step: int, total_steps: int, initial: float, schedule: str = "linear") -> float:
    """The drop fraction at (update) step ``step``: ``initial`` decaying to 0 at ``total_steps``."""
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return initial * (1.0 - progress)
    if schedule == "cosine":
        return initial * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return initial
    raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")


def _labelled(label: str):
    """Name a scheduler phase in torch.profiler traces (``benchmarks/profile_e2e.py --profile-update``); a
    record_function range costs a few microseconds per call: once per phase, and once per layer for the probe
    (next to its per-layer GEMM and top-k)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return inner
    return wrap


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _indices_guard(layer) -> tuple:
    """What identifies a layer's current index set without reading it: its indices tensor and version."""
    return weakref.ref(layer.indices), layer.indices._version


def _same_indices(guard: tuple, layer) -> bool:
    return guard[0]() is layer.indices and guard[1] == layer.indices._version


def _scale_of(scaler) -> Optional[torch.Tensor]:
    """The GradScaler's current scale as a tensor, without a host sync (None when no scaling)."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # not created yet: get_scale() returns the initial scale without syncing
        return torch.tensor(float(scaler.get_scale()), dtype=torch.float32)
    return scale.detach().clone().float()


def _check_int(name, value, lo) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


class _Probe:
    """The callable set as ``layer.gradient_probe`` (holds the scheduler weakly). With ``gathers_delta_gradient``
    the layer's backward hands it the active indices and takes their gradient from the probe's blocks."""

    def __init__(self, scheduler: "SpielScheduler"):
        self._ref = weakref.ref(scheduler)

    @property
    def gathers_delta_gradient(self) -> bool:  # read at each forward: the scheduler's option may change
        scheduler = self._ref()
        return scheduler is not None and scheduler.reuse_probe_gradient

    def __call__(self, layer, grad_output, input, indices=None):
        scheduler = self._ref()
        if scheduler is None:
            layer.gradient_probe = None
            return None
        return scheduler._on_probe(layer, grad_output, input, indices)


def _generic_reindex(optimizer, param, order, regrown) -> None:
    """Fallback for optimizers without ``reindex`` (e.g. torch.optim.AdamW): permute every state tensor shaped
    like the values, zero it at regrown slots (a shared scalar ``step`` cannot be reset per slot)."""
    state = getattr(optimizer, "state", {}).get(param)
    if not state:
        return
    src = order.clamp(min=0)
    for key, t in list(state.items()):
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == order.shape[0] and key != "step":
            state[key] = t.index_select(0, src).masked_fill_(regrown, 0)


class SpielScheduler:
    """SpIEL index-update scheduler for the SparseDeltaLinear layers of ``model``.

    Args:
        model: the model (``nn.Module``, DDP-wrapped is fine) or an iterable of SparseDeltaLinear layers (those
            whose ``values`` do not require grad are left alone).
        optimizer: the optimizer of the layers' ``values`` (:class:`spiel.optim.SparseAdamW`, :class:`spiel.optim.SM3`
            or any optimizer: spiel optimizers' ``reindex`` keeps per-slot state consistent; others get their
            per-slot state tensors permuted and zeroed at regrown slots). ``mode="ma"`` needs an optimizer with
            ``accumulators(layer) -> (row, col)`` (:class:`spiel.optim.SM3`).
        mode: ``"ag"`` (accumulated gradients) or ``"ma"`` (SM3 momentum approximation).
        total_steps: number of optimizer steps of the run (the drop fraction reaches 0 there; no update at or
            after it). May be None until :meth:`set_total_steps` (SpielCallback sets it from the Trainer).
        reselection_steps: S, steps between index updates (default 20).
        accumulation_steps: gamma, AG: steps of candidate-gradient accumulation before each update (default 5,
            1 <= gamma < S).
        drop_fraction: fraction of each layer's k dropped (and regrown) at the first update (default 0.2),
            decaying per ``schedule`` ("linear" default, "cosine", or "constant").
        candidates_per_slot: AG: candidates per regrown index (default 1: exactly n, so they are deferred to the
            update in host memory instead of being installed and accumulated; see the module docstring).
        block_elements: AG: dense-gradient elements formed at once by the candidate probe (rows of
            ``block_elements // in_features``; default 2**26, a 128 MiB transient during the probe's backward
            with bf16/fp16 activations on CUDA (256 MiB in fp32): one block per 7B-sized layer, 2.5x faster
            than 2**24 blocks on the H100).
        grad_scaler: a ``torch.amp.GradScaler`` when training with fp16 loss scaling: candidate gradients are
            divided by the scale used in their backward, and a step whose candidate gradients are not finite is
            skipped. Call ``scaler.update()`` before ``scheduler.step()``. Without it candidate gradients are
            summed as they are, by autograd, into the candidates' ``.grad`` (fine for any constant scale, since
            they are only ranked; a non-finite sum counts as 0 at the reselection): no per-step copy.
        process_group: torch.distributed group (default: the world, when initialised).
        check_consistency: after each update, verify (one all-gather of checksums) that every rank holds the
            same indices; raises RuntimeError otherwise.
        reuse_probe_gradient: AG, opt-in (default False): in the probe's backward, the layer's own delta gradient
            is read from the probe's dense-gradient blocks instead of a second GEMM (its sddmm): one dense GEMM per
            layer instead of two on the probe step (51 ms less GPU work per 7B cycle on an H100; its wall-clock
            gain was within the host's noise there, session 15). On bf16/fp16 models those blocks are rounded to
            that dtype (as the published SpIEL code's dense weight gradient is at every step), so one step in S
            takes the values' gradient in bf16 precision; the default keeps the fp32-accumulated sddmm.

    Call :meth:`step` once after every optimizer step (after ``optimizer.step()``, before or after
    ``zero_grad()``). Save/restore with :meth:`state_dict` / :meth:`load_state_dict` together with the model's
    state_dict (the indices are buffers) and the optimizer's; load the model first.
    """

    def __init__(self, model, optimizer, mode: str = "ag", total_steps: Optional[int] = None, *,
                 reselection_steps: int = 20, accumulation_steps: int = 5, drop_fraction: float = 0.2,
                 schedule: str = "linear", candidates_per_slot: int = 1, block_elements: int = 1 << 26,
                 grad_scaler=None, process_group=None, check_consistency: bool = False,
                 reuse_probe_gradient: bool = False):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if total_steps is not None:
            _check_int("total_steps", total_steps, 1)
        for name, value, lo in (("reselection_steps", reselection_steps, 1),
                                ("accumulation_steps", accumulation_steps, 1),
                                ("candidates_per_slot", candidates_per_slot, 1), ("block_elements", block_elements, 1)):
            _check_int(name, value, lo)
        if mode == "ag" and accumulation_steps >= reselection_steps:
            raise ValueError(f"accumulation_steps ({accumulation_steps}) must be < reselection_steps "
                             f"({reselection_steps})")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 <= drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be a float in [0, 1], got {drop_fraction!r}")
        if mode == "ma" and not callable(getattr(optimizer, "accumulators", None)):
            raise TypeError("mode='ma' needs an optimizer with SM3 accumulators (spiel.optim.SM3)")
        # layers whose deltas are frozen (values.requires_grad False) are left alone
        self.layers = [(n, m) for n, m in sparse_layers(model) if m.values.requires_grad]
        self._layer_list = [m for _, m in self.layers]
        self.optimizer = optimizer
        self.mode = mode
        self.total_steps = total_steps
        self.reselection_steps = reselection_steps
        self.accumulation_steps = accumulation_steps
        self.drop_fraction = float(drop_fraction)
        self.schedule = schedule
        self.candidates_per_slot = candidates_per_slot
        self.block_elements = block_elements
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.check_consistency = check_consistency
        self.step_count = 0
        self._by_id = {id(layer): (name, layer) for name, layer in self.layers}
        self._by_name = {name: layer for name, layer in self.layers}
        self.reuse_probe_gradient = bool(reuse_probe_gradient)
        self._probe = _Probe(self)
        self._armed_for: Optional[int] = None
        self._armed: Dict[str, int] = {}  # layer name -> number of candidates wanted
        self._probe_results: Dict[str, tuple] = {}
        self._window: Optional[dict] = None  # installed candidates: update step, names, accumulators
        self._deferred: Optional[dict] = None  # candidates_per_slot=1: update step, names, host positions, guards
        self._scale: Optional[torch.Tensor] = None
        self.last_update: Dict[str, int] = {}  # layer name -> indices replaced at the last update
        self._maybe_arm()

    # ---------------------------------------------------------------------------------------- schedule
    def drop_fraction_at(self, step: int) -> float:
        return drop_fraction_at(step, self.total_steps, self.drop_fraction, self.schedule)

    def is_update_step(self, step: int) -> bool:
        if self.total_steps is None:
            return False
        return step > 0 and step % self.reselection_steps == 0 and step < self.total_steps

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run length (when the scheduler was built with ``total_steps=None``, e.g. by SpielCallback
        from the Trainer's ``max_steps``)."""
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self._maybe_arm()

    def reset(self, step_count: int = 0) -> None:
        """Drop pending probes and candidates and continue counting from ``step_count``."""
        self._disarm()
        self._clear_window()
        self.step_count = _check_int("step_count", step_count, 0)
        self._scale = None
        self._maybe_arm()

    def num_regrow(self, layer, step: int) -> int:
        """Indices of ``layer`` dropped and regrown at update step ``step``."""
        k = layer.values.numel()
        out_f, in_f = layer_shape(layer)
        n = int(math.floor(self.drop_fraction_at(step) * k + 1e-9))
        return max(0, min(n, k, out_f * in_f - k))

    @property
    def next_update_step(self) -> Optional[int]:
        nxt = (self.step_count // self.reselection_steps + 1) * self.reselection_steps
        return nxt if self.is_update_step(nxt) else None

    # ---------------------------------------------------------------------------------------- main entry
    def step(self) -> None:
        """Advance by one optimizer step; runs the index update when it is due. No host sync except during an
        index update (every ``reselection_steps``) and the candidate installation of AG. Layers trained merged
        get their merged entries rewritten from the stepped values here, all at once
        (:func:`spiel.nn.refresh_merged_entries`), instead of one by one in their forwards."""
        if self.total_steps is None:
            raise RuntimeError("SpielScheduler.step(): total_steps is not set (pass it or call set_total_steps)")
        t = self.step_count + 1
        self.step_count = t
        if self._window is not None:
            self._harvest()
        if self._armed_for is not None and t >= self._armed_for - self.accumulation_steps:
            self._install()
        if self.is_update_step(t):
            self._update(t)
        elif any(w is not None and w["update"] <= t for w in (self._window, self._deferred)):
            self._clear_window()
        self._maybe_arm()
        self._scale = _scale_of(self.grad_scaler) if self._window is not None else None
        refresh_merged_entries(self._layer_list)  # the optimizer has stepped: ~4 launches per layer saved

    # ---------------------------------------------------------------------------------------- AG: probe
    def _maybe_arm(self) -> None:
        if self.mode != "ag" or self._armed_for is not None or self._window is not None \
                or self._deferred is not None:
            return
        update = self.step_count + 1 + self.accumulation_steps
        if not self.is_update_step(update):
            return
        wanted = {}
        for name, layer in self.layers:
            n = self.num_regrow(layer, update)
            if n > 0:
                out_f, in_f = layer_shape(layer)
                wanted[name] = min(n * self.candidates_per_slot, out_f * in_f - layer.values.numel())
        if not wanted:
            return
        self._armed_for = update
        self._armed = wanted
        self._probe_results = {}
        for name in wanted:
            self._by_name[name].gradient_probe = self._probe

    def _disarm(self) -> None:
        for name in self._armed:
            layer = self._by_name[name]
            if layer.gradient_probe is self._probe:
                layer.gradient_probe = None
        self._armed_for = None
        self._armed = {}
        self._probe_results = {}

    @_labelled("spiel.scheduler.probe")
    def _on_probe(self, layer, grad_output, input, indices=None) -> Optional[torch.Tensor]:
        """Pick the layer's candidates from its dense gradient; with ``indices`` (the layer's active ones, handed in
        by its backward) also return their gradient, read from the same blocks (None when not probing)."""
        name, _ = self._by_id.get(id(layer), (None, None))
        if layer.gradient_probe is self._probe:
            layer.gradient_probe = None  # fired: later backwards of this step don't probe again
        if name is None or name not in self._armed or name in self._probe_results:
            return None
        gathered = None
        if indices is not None:
            positions, scores, gathered = top_gradient_entries(grad_output, input, layer.indices, self._armed[name],
                                                               self.block_elements, gather=indices)
        else:
            positions, scores = top_gradient_entries(grad_output, input, layer.indices, self._armed[name],
                                                     self.block_elements)
        if _dist.world(self.process_group)[0] == 1:
            # only the positions are installed: keep them in the layer's index dtype and drop the scores (the
            # results of every layer are alive until the step ends: 12 -> 4 B per candidate at the AG peak)
            positions, scores = positions.to(layer.indices.dtype), None
        self._probe_results[name] = (positions, scores)
        return gathered

    @_labelled("spiel.scheduler.install")
    def _install(self) -> None:
        """Turn the probe results into installed candidates (identical on every rank)."""
        update, armed, results = self._armed_for, self._armed, self._probe_results
        self._disarm()
        names = list(armed)  # model order: identical on every rank
        chosen: Dict[str, torch.Tensor] = {}
        size, _ = _dist.world(self.process_group)
        if size > 1:
            device = self.layers[0][1].values.device
            c_total = sum(armed.values())
            pos = torch.full((c_total,), -1.0, dtype=torch.float64, device=device)
            score = torch.zeros(c_total, dtype=torch.float64, device=device)
            off = 0
            for name in names:
                if name in results:
                    p, s = results[name]
                    pos[off:off + p.numel()] = p.to(device=device, dtype=torch.float64)
                    score[off:off + s.numel()] = s.to(device=device, dtype=torch.float64)
                off += armed[name]
            gathered = _dist.all_gather_stack(torch.cat([pos, score]), self.process_group)
            all_pos, all_score = gathered[:, :c_total].to(torch.int64), gathered[:, c_total:]
            off = 0
            for name in names:
                c = armed[name]
                sel = union_top(all_pos[:, off:off + c], all_score[:, off:off + c], c)
                off += c
                if sel is not None:
                    chosen[name] = sel
        else:
            for name in names:
                if name in results:
                    chosen[name] = results[name][0]
        if self.candidates_per_slot == 1:
            self._defer(update, [(name, chosen[name]) for name in names if name in chosen and chosen[name].numel()])
            return
        win_names, accs, replan = [], [], []
        for name in names:
            if name not in chosen or chosen[name].numel() == 0:
                continue
            layer = self._by_name[name]
            # A layer whose active indices run without a plan (sddmm's dense bands: every row band, then a
            # gather) keeps running without one with candidates added: the cost model's dense_blas cost does not
            # depend on the index set beyond k, and every other strategy only gets dearer with more indices.
            # Deciding it again would count the presence of k + c entries per layer (21 ms of kernels and a host
            # read at 7B).
            if getattr(layer, "sddmm_plan", None) is not None or not isinstance(layer, SparseDeltaLinear):
                replan.append(layer)
            # probe/union results are sorted, unique, in range and outside the active indices
            set_candidates_trusted(layer, chosen[name].to(layer.indices.device))
            win_names.append(name)
            accs.append(self._accumulator(layer))
        rebuild_plans(replan)  # one host read for every layer that had a plan
        self._window = {"update": update, "names": win_names, "accs": accs} if win_names else None

    def _defer(self, update: int, chosen) -> None:
        """Keep ``(name, positions)`` until ``update`` without installing them: each layer regrows exactly its
        positions then (n = c, so accumulated gradients could not reorder them). On CUDA the positions move to
        pinned host memory (an async copy: no sync, no GPU memory during the gamma steps). Each layer's indices
        tensor and version are recorded: if its indices change before ``update`` the layer is skipped, as a
        layer whose installed candidates were cleared is."""
        names, positions, guards, copied = [], [], [], False
        for name, pos in chosen:
            layer = self._by_name[name]
            if pos.is_cuda:
                host = torch.empty(pos.shape, dtype=pos.dtype, pin_memory=True)
                host.copy_(pos, non_blocking=True)
                pos = host
                copied = True
            names.append(name)
            positions.append(pos)
            guards.append(_indices_guard(layer))
        ready = None
        if copied:  # after the last copy (one stream): waited on by the update and by state_dict
            ready = torch.cuda.Event()
            ready.record()
        self._deferred = {"update": update, "names": names, "positions": positions, "guards": guards,
                          "ready": ready} if names else None

    def _accumulator(self, layer) -> torch.Tensor:
        """The fp32 accumulator of a layer's candidate gradients. Without a GradScaler it is the candidates'
        own ``.grad`` (autograd adds every backward into it in place: no copy per step, no second buffer);
        with one, a separate buffer that :meth:`_harvest` adds each step's unscaled gradient to."""
        grad = getattr(getattr(layer, "candidate_values", None), "grad", None)
        if self.grad_scaler is None and isinstance(grad, torch.Tensor) and grad.dtype == torch.float32 \
                and grad.shape == layer.candidates.shape:
            return grad
        return torch.zeros(layer.candidates.numel(), dtype=torch.float32, device=layer.indices.device)

    @_labelled("spiel.scheduler.harvest")
    @torch.no_grad()
    def _harvest(self) -> None:
        """Move this step's candidate gradients into the fp32 accumulators (unscaled; skipped if not finite).
        Nothing to do for the layers whose accumulator is the candidates' ``.grad`` (no GradScaler)."""
        win = self._window
        by_device = defaultdict(list)
        for i, name in enumerate(win["names"]):
            layer = self._by_name[name]
            cv = getattr(layer, "candidate_values", None)
            grad = None if cv is None else cv.grad
            if grad is not None and grad is not win["accs"][i]:
                by_device[grad.device].append((i, grad))
        for device, items in by_device.items():
            grads = [g for _, g in items]
            accs = [win["accs"][i] for i, _ in items]
            flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
            flat = flat.float()
            if self._scale is not None:
                flat.div_(self._scale.to(device))
            flat = torch.where(torch.isfinite(flat).all(), flat, torch.zeros((), device=device))
            torch._foreach_add_(accs, list(flat.split([a.numel() for a in accs])))
            torch._foreach_zero_(grads)

    def _clear_window(self, keep_plan_of=()) -> None:
        """Clear the installed (and the deferred) candidates; layers named in ``keep_plan_of`` get
        ``set_indices`` right after, so their sddmm plan is not rebuilt here."""
        self._deferred = None
        if self._window is not None:
            stale = []
            for name in self._window["names"]:
                layer = self._by_name[name]
                if getattr(layer, "candidates", None) is not None:
                    if isinstance(layer, SparseDeltaLinear):
                        layer.clear_candidates(rebuild_plan=False)
                        if name not in keep_plan_of:
                            stale.append(layer)
                    else:
                        layer.clear_candidates()
            rebuild_plans(stale)  # one host read for every layer
        self._window = None

    # ---------------------------------------------------------------------------------------- update
    @_labelled("spiel.scheduler.update")
    @torch.no_grad()
    def _update(self, t: int) -> None:
        """Drop + regrow in every layer, batched: layers of one device (and, for MA, one shape) with the same k
        and n are handled by a fixed number of launches, with no host sync per layer."""
        self.last_update = {}
        todo = []  # (name, layer, regrown positions: [n] int64 ascending)
        if self.mode == "ag" and self._deferred is not None:
            deferred = self._deferred
            if deferred["update"] == t:
                if deferred["ready"] is not None:
                    torch.cuda.current_stream().wait_event(deferred["ready"])  # the copies to host are done
                for name, pos, guard in zip(deferred["names"], deferred["positions"], deferred["guards"]):
                    layer = self._by_name[name]
                    # n == c unless the indices changed behind our back (then the positions may be active)
                    if _same_indices(guard, layer) and self.num_regrow(layer, t) == pos.numel():
                        todo.append((name, layer, pos.to(device=layer.indices.device, dtype=torch.int64,
                                                          non_blocking=True)))
            self._clear_window()
        elif self.mode == "ag":
            win = self._window
            if win is None or win["update"] != t:
                self._clear_window()
                return
            accs = win["accs"]
            if _dist.world(self.process_group)[0] > 1 and accs:
                flat = _dist.sum_consensus(torch.cat(accs), self.process_group)
                accs = list(flat.split([a.numel() for a in accs]))
            items = []  # (name, layer, candidates, accumulated gradient, n)
            for name, acc in zip(win["names"], accs):
                layer = self._by_name[name]
                if getattr(layer, "candidates", None) is None or layer.candidates.numel() != acc.numel():
                    continue  # candidates cleared behind our back (e.g. a model state_dict load): skip
                n = min(self.num_regrow(layer, t), acc.numel())
                if n > 0:
                    items.append((name, layer, layer.candidates, acc, n))
            for batch in batches(items, key=lambda it: (it[1].indices.device, it[3].numel(), it[4]),
                                 size=lambda it: it[3].numel()):
                n = batch[0][4]
                # accumulated in place without a GradScaler: a non-finite entry counts as 0 (with one, a step
                # whose candidate gradients are not finite was skipped whole by the harvest)
                scores = torch.nan_to_num_(torch.stack([it[3] for it in batch]), nan=0.0, posinf=0.0, neginf=0.0)
                slots = top_abs_rows(scores, n, ascending=True)                                 # [L, n]
                cands = torch.stack([it[2] for it in batch]).to(torch.int64)                   # ascending
                regrown = cands.gather(1, slots.to(cands.device))
                todo.extend((it[0], it[1], row) for it, row in zip(batch, regrown.unbind(0)))  # one op, not L
            self._clear_window(keep_plan_of={name for name, _, _ in todo})
        else:
            wanted = [(name, layer, self.num_regrow(layer, t)) for name, layer in self.layers]
            wanted = [item for item in wanted if item[2] > 0]
            many = getattr(self.optimizer, "accumulators_many", None)  # one layout check, not one per layer
            stats = (many([layer for _, layer, _ in wanted]) if callable(many) else
                     [self.optimizer.accumulators(layer) for _, layer, _ in wanted])
            if _dist.world(self.process_group)[0] > 1 and wanted:
                sizes = [s.numel() for rc in stats for s in rc]
                flat = _dist.max_consensus(torch.cat([s.float() for rc in stats for s in rc]), self.process_group)
                parts = list(flat.split(sizes))
                stats = [(parts[2 * i], parts[2 * i + 1]) for i in range(len(wanted))]
            items = [(name, layer, n, row, col) for (name, layer, n), (row, col) in zip(wanted, stats)]
            for batch in batches(items, key=lambda it: (it[3].device, layer_shape(it[1]), it[1].indices.numel(),
                                                        it[2]),
                                 size=lambda it: it[1].indices.numel()):
                picked = batched_topk_outer([it[3].float() for it in batch], [it[4].float() for it in batch],
                                            [it[2] for it in batch], [it[1].indices for it in batch],
                                            ordered=False)
                regrown = torch.sort(torch.stack(picked), dim=1).values
                todo.extend((it[0], it[1], row) for it, row in zip(batch, regrown.unbind(0)))  # one op, not L
        self._apply(todo)
        if self.check_consistency and _dist.world(self.process_group)[0] > 1:
            self._verify()

    @_labelled("spiel.scheduler.apply")
    def _apply(self, todo) -> None:
        """Drop ``len(regrown)`` smallest-|value| entries per layer, insert ``regrown`` (value 0), keep indices
        sorted, and permute the optimizer's per-slot state; batched by (device, k, n)."""
        # the updated layers' gradients are stale once their indices change (set_indices drops them): free them
        # all before the first batch, not batch by batch (the update runs before zero_grad)
        for _, layer, _ in todo:
            layer.values.grad = None
        for batch in batches(todo, key=lambda it: (it[1].values.device, it[1].values.numel(), it[2].numel()),
                             size=lambda it: it[1].values.numel()):
            regrown = torch.stack([it[2].to(it[1].values.device) for it in batch])
            # plans rebuilt once below: each rebuild reads the device back, i.e. waits for the queued work, and
            # ~40 batches of the 7B update serialised the host and the GPU (236 ms of host for 84 ms of kernels)
            drop_and_regrow([it[1] for it in batch], regrown, self.optimizer, _generic_reindex, rebuild_plan=False)
            for name, _, picked in batch:
                self.last_update[name] = picked.numel()
        rebuild_plans([layer for _, layer, _ in todo])  # one host read for every layer

    def _verify(self) -> None:
        sums = []
        for _, layer in self.layers:
            idx = layer.indices.long()
            weights = torch.arange(1, idx.numel() + 1, device=idx.device, dtype=torch.int64)
            sums.append(torch.stack([(idx * weights).sum(), idx.sum(), torch.tensor(idx.numel(), device=idx.device)]))
        local = torch.stack(sums) if sums else torch.zeros(0, 3, dtype=torch.int64)
        if not _dist.same_on_all_ranks(local, self.process_group):
            raise RuntimeError("SpielScheduler: ranks hold different indices after the update at step "
                               f"{self.step_count} (are the values replicated, e.g. by DDP?)")

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Step count, hyperparameters and pending AG candidates with their accumulated gradients (the
        indices themselves live in the model's state_dict)."""
        window = None
        if self._deferred is not None:  # positions only ("accs" None): regrown as they are at "update"
            d = self._deferred
            if d["ready"] is not None:
                d["ready"].synchronize()  # the positions' copies to host have landed
            window = {"update": d["update"], "names": list(d["names"]),
                      "candidates": [p.clone() for p in d["positions"]], "accs": None}
        elif self._window is not None:
            live = [(n, self._by_name[n].candidates, a) for n, a in zip(self._window["names"], self._window["accs"])
                    if getattr(self._by_name[n], "candidates", None) is not None]
            window = {"update": self._window["update"], "names": [n for n, _, _ in live],
                      "candidates": [c.detach().clone() for _, c, _ in live],
                      "accs": [a.detach().clone() for _, _, a in live]}
        return {"version": 1, "mode": self.mode, "step_count": self.step_count, "total_steps": self.total_steps,
                "reselection_steps": self.reselection_steps, "accumulation_steps": self.accumulation_steps,
                "drop_fraction": self.drop_fraction, "schedule": self.schedule,
                "candidates_per_slot": self.candidates_per_slot, "window": window,
                "scale": None if self._scale is None else self._scale.clone(),
                "layer_names": [n for n, _ in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after loading the model's state_dict, which clears candidates)."""
        if state.get("mode") != self.mode:
            raise ValueError(f"state_dict is for mode {state.get('mode')!r}, this scheduler is {self.mode!r}")
        names = state.get("layer_names")
        if names is not None and len(names) != len(self.layers):
            raise ValueError(f"state_dict has {len(names)} sparse layers, the model has {len(self.layers)}")
        for key in ("total_steps", "reselection_steps", "accumulation_steps", "drop_fraction", "schedule",
                    "candidates_per_slot"):
            setattr(self, key, state[key])
        self._disarm()
        self._clear_window()
        for _, layer in self.layers:  # candidates left from anything else
            if getattr(layer, "candidates", None) is not None:
                layer.clear_candidates()
        self.step_count = int(state["step_count"])
        window = state.get("window")
        if window is not None:
            lookup = {_strip(n): layer for n, layer in self.layers}
            saved_names = names or window["names"]
            positional = {_strip(s): self.layers[i][0] for i, s in enumerate(saved_names)} if names else {}

            def resolve(name):
                key = _strip(name)
                layer = lookup.get(key)
                if layer is None and key in positional:
                    layer = self._by_name[positional[key]]
                if layer is None:
                    raise ValueError(f"state_dict has candidates for unknown layer {name!r}")
                return layer

            if window.get("accs") is None:  # deferred candidates (candidates_per_slot=1)
                self._defer(int(window["update"]), [(self._by_id[id(resolve(name))][0], cand)
                                                    for name, cand in zip(window["names"], window["candidates"])])
            else:
                win_names, accs = [], []
                for name, cand, acc in zip(window["names"], window["candidates"], window["accs"]):
                    layer = resolve(name)
                    layer.set_candidates(cand.to(layer.indices.device))
                    win_names.append(self._by_id[id(layer)][0])
                    mine = self._accumulator(layer)
                    mine.copy_(acc.to(device=mine.device, dtype=torch.float32))
                    accs.append(mine)
                self._window = {"update": int(window["update"]), "names": win_names, "accs": accs}
        scale = state.get("scale")
        self._scale = None if scale is None else scale.clone()
        self._maybe_arm()
