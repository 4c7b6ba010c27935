"""``SparseDeltaLinear``: a frozen linear layer plus a trainable sparse delta (SpIEL).

The effective weight is ``W + scatter(indices, values)``: ``W`` [out, in] is frozen (a dense tensor, a
bitsandbytes ``Params4bit`` NF4 weight or a :class:`spiel.quant.NF4Weight`), ``indices`` [k] are sorted unique
flat row-major positions and ``values`` [k] the trainable deltas. The forward is
:func:`spiel.ops.sparse_delta_linear` (no host sync, no out x in tensor kept for backward).
"""
from __future__ import annotations

import functools
import math
import operator
import sys
from collections import defaultdict
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.linear import apply_sparse_delta_linear
from ..ops.backends import sddmm_plan as _plan
from .._batching import group_batches
from ..quant.nf4 import NF4Weight

__all__ = ["SparseDeltaLinear", "random_indices", "index_dtype_for", "resolve_num_deltas", "is_bnb_linear4bit",
           "rebuild_sddmm_plans", "set_indices_many", "refresh_merged_entries"]

INT32_LIMIT = 2**31 - 1
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# out*in up to this size: exact sampling with torch.randperm (cheap); above, sample with replacement + unique
_RANDPERM_LIMIT = 1 << 22
_NF4_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_nested_code")


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 when every flat position of an ``numel``-element weight fits in int32, else int64."""
    return torch.int32 if numel <= INT32_LIMIT else torch.int64


def _bnb_linear4bit_cls():
    """bitsandbytes' ``Linear4bit`` if bitsandbytes is imported (a Linear4bit cannot exist otherwise)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    try:
        return bnb.nn.Linear4bit
    except AttributeError:  # partially imported
        return None


def is_bnb_linear4bit(module) -> bool:
    cls = _bnb_linear4bit_cls()
    return cls is not None and isinstance(module, cls)


def _is_params4bit(tensor) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(tensor, getattr(bnb.nn, "Params4bit", ()))


def resolve_num_deltas(numel: int, num_deltas=None, density=None, *, name: str = "layer") -> int:
    """The number of deltas k of a weight of ``numel`` elements from exactly one of ``num_deltas``/``density``.

    ``density`` must be in (0, 1]; k = round(density * numel), at least 1. ``num_deltas`` must be an integer in
    [0, numel].
    """
    if (num_deltas is None) == (density is None):
        raise ValueError(f"{name}: give exactly one of num_deltas= or density=")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"{name}: density must be a float in (0, 1], got {type(density).__name__}")
        density = float(density)
        if not (0.0 < density <= 1.0) or math.isnan(density):
            raise ValueError(f"{name}: density must be in (0, 1], got {density}")
        return max(1, min(numel, int(round(density * numel))))
    if isinstance(num_deltas, bool):
        raise TypeError(f"{name}: num_deltas must be an integer, got bool")
    try:
        k = operator.index(num_deltas)
    except TypeError:
        raise TypeError(f"{name}: num_deltas must be an integer, got {type(num_deltas).__name__}") from None
    if k < 0:
        raise ValueError(f"{name}: num_deltas must be >= 0, got {k}")
    if k > numel:
        raise ValueError(f"{name}: num_deltas={k} is more than the weight's {numel} elements")
    return k


def random_indices(numel: int, k: int, *, generator: Optional[torch.Generator] = None,
                   device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``k`` sorted flat positions drawn uniformly without replacement from ``range(numel)``.

    Never materialises ``numel`` elements when it is large: small weights use ``torch.randperm``; large ones
    draw with replacement, keep the unique positions and top up until there are at least k (the set of
    distinct draws is exchangeable, so a uniform random k-subset of it is a uniform k-subset of the range);
    when k > numel / 2 the complement is sampled instead. Sampling runs on the generator's device (CPU by
    default) and the result is moved to ``device``.
    """
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}], got {k}")
    dtype = dtype or index_dtype_for(numel)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if k == 0:
        idx = torch.empty(0, dtype=torch.int64, device=gen_device)
    elif numel <= _RANDPERM_LIMIT:
        idx = torch.randperm(numel, generator=generator, device=gen_device)[:k].sort().values
    elif 2 * k <= numel:
        idx = _sample_sparse(numel, k, generator, gen_device)
    else:  # dense pick: sample the (smaller) complement; the result itself is already Theta(numel)
        drop = _sample_sparse(numel, numel - k, generator, gen_device)
        keep = torch.ones(numel, dtype=torch.bool, device=gen_device)
        keep[drop] = False
        idx = keep.nonzero().view(-1)
    return idx.to(device=device if device is not None else gen_device, dtype=dtype)


def _sample_sparse(numel: int, k: int, generator, device) -> torch.Tensor:
    chosen = torch.empty(0, dtype=torch.int64, device=device)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(numel, (need + need // 8 + 16,), generator=generator, device=device, dtype=torch.int64)
        chosen = torch.unique(torch.cat([chosen, draw]))
    if chosen.numel() > k:
        pick = torch.randperm(chosen.numel(), generator=generator, device=device)[:k]
        chosen = chosen[pick].sort().values
    return chosen


def check_index_values(indices: torch.Tensor, numel: int, *, what: str = "indices") -> None:
    """Full check of an index tensor (1-D integer, in range, strictly increasing). A host sync: call it once
    per index update, never in forward."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{what} must be an integer tensor (int32/int64), got {indices.dtype}")
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise ValueError(f"{what} must be in [0, {numel}) (the weight's number of elements), "
                         f"got values in [{lo}, {hi}]")
    if indices.numel() > 1:
        steps = indices[1:].long() - indices[:-1].long()
        if bool((steps < 0).any()):
            raise ValueError(f"{what} must be sorted in ascending order")
        if bool((steps == 0).any()):
            raise ValueError(f"{what} must be unique, found duplicates")


def _kaiming_init_(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    # nn.Linear.reset_parameters
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _checked_params4bit(linear):
    """The ``Params4bit`` of a bitsandbytes ``Linear4bit``, checked to be quantized NF4 in bnb's plain layout."""
    w = linear.weight
    qs = getattr(w, "quant_state", None)
    if qs is None and getattr(linear, "quant_state", None) is not None:
        qs = w.quant_state = linear.quant_state
    if qs is None or not getattr(w, "bnb_quantized", True):
        raise ValueError("the bitsandbytes Linear4bit is not quantized yet: move it to its device first "
                         "(bitsandbytes quantizes on .to(device) / .cuda())")
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"only NF4 Linear4bit layers are supported, got quant_type={qs.quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference repacks the weight on first forward: undo it (bnb's own inverse)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
        linear.quant_state = w.quant_state
    return w


class SparseDeltaLinear(nn.Linear):
    """A drop-in :class:`torch.nn.Linear` whose frozen weight carries a trainable sparse delta.

    ``y = x @ (W + scatter(indices, values))^T + bias``.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear` (the weight is initialised as
            ``nn.Linear`` does, and frozen).
        num_deltas | density: the number of trainable deltas k (exactly one; density in (0, 1],
            k = round(density * out * in), at least 1).
        device, dtype: of the weight and bias.
        values_dtype: dtype of ``values`` (fp32 default; bf16/fp16 allowed).
        generator: ``torch.Generator`` for the initial indices (uniform without replacement).

    Attributes (the layer contract, see ARCHITECTURE.md):
        weight: frozen ``nn.Parameter`` [out, in]; for an NF4 base the bitsandbytes ``Params4bit`` (state_dict
            compatible with ``Linear4bit``) or the :class:`spiel.quant.NF4Weight` itself.
        bias: ``nn.Parameter`` [out] or None.
        indices: buffer [k] int32 (int64 when out*in >= 2**31), sorted, unique.
        values: ``nn.Parameter`` [k], initially 0.
        candidates / candidate_values: AG candidates (see :meth:`set_candidates`), else None.
        gradient_probe: None or ``probe(layer, grad_output_2d, input_2d)`` called in backward (with a true
            ``gathers_delta_gradient`` attribute: ``probe(layer, grad_output_2d, input_2d, indices)``, which may
            return the values' gradient; see :func:`spiel.ops.sparse_delta_linear`).
        fp8_weight_grad: False (default); True takes the delta gradient from e4m3 operands
            (:func:`spiel.ops.sddmm_fp8`).
        sddmm_plan: non-persistent buffer, plan of ``indices`` (or ``cat(indices, candidates)``); None where
            both GPU backends would run dense_blas, which needs no plan (LoRA-like densities: saves 12 B per delta).

    state_dict: ``weight`` and ``bias`` under ``nn.Linear``'s keys (plus bitsandbytes' ``weight.*`` quant-state
    keys for a ``Linear4bit`` base, or ``weight_packed``/``weight_absmax``/... for a spiel ``NF4Weight`` base),
    ``indices`` and ``values``. Loading ``indices``/``values`` with a different k *resizes* the layer (both
    must have the same length; indices are validated; ``values`` keeps its Parameter identity but its
    optimizer state, if any, no longer fits: build the optimizer after loading).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_deltas: Optional[int] = None,
                 density: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 values_dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> None:
        nn.Module.__init__(self)
        in_features, out_features = int(in_features), int(out_features)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        k = resolve_num_deltas(in_features * out_features, num_deltas, density, name="SparseDeltaLinear")
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        b = torch.empty(out_features, device=device, dtype=dtype) if bias else None
        _kaiming_init_(weight, b)
        self._setup_base(in_features, out_features, nn.Parameter(weight, requires_grad=False),
                         None if b is None else nn.Parameter(b))
        self._setup_deltas(k, values_dtype, generator)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear, num_deltas: Optional[int] = None, *, density: Optional[float] = None,
                    values_dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
                    bias: Optional[torch.Tensor] = None) -> "SparseDeltaLinear":
        """Wrap an existing layer, sharing its weight storage (no copy).

        Args:
            linear: an ``nn.Linear`` (its ``weight``/``bias`` Parameters are shared and the weight is frozen),
                a bitsandbytes ``Linear4bit`` with ``quant_type="nf4"`` (its NF4 weight is used as is, never
                re-quantized; the ``Params4bit`` stays the module's ``weight``), or a
                :class:`spiel.quant.NF4Weight` (then ``bias=`` may give a bias tensor).
            num_deltas | density: k, as in the constructor.
            values_dtype, generator: as in the constructor.
        """
        if isinstance(linear, SparseDeltaLinear):
            raise TypeError("from_linear got a SparseDeltaLinear: it already has deltas")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if isinstance(linear, NF4Weight):
            out_f, in_f = linear.shape
            if bias is not None and not isinstance(bias, nn.Parameter):
                bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
            self._setup_base(in_f, out_f, linear, bias)
        elif is_bnb_linear4bit(linear):
            if bias is not None:
                raise TypeError("bias= is only for an NF4Weight input")
            self._setup_base(linear.in_features, linear.out_features, _checked_params4bit(linear), linear.bias)
        elif isinstance(linear, nn.Linear):
            if bias is not None:
                raise TypeError("bias= is only for an NF4Weight input")
            w = linear.weight
            if not isinstance(w, torch.Tensor) or _is_params4bit(w) or w.dtype not in _FLOAT_DTYPES or w.dim() != 2:
                raise TypeError(
                    f"from_linear supports nn.Linear with a bf16/fp16/fp32 weight, bitsandbytes Linear4bit (nf4) or "
                    f"spiel NF4Weight; got {type(linear).__name__} with weight {type(w).__name__} of dtype "
                    f"{getattr(w, 'dtype', None)}")
            self._setup_base(linear.in_features, linear.out_features, w, linear.bias)
        else:
            raise TypeError(f"from_linear expects nn.Linear, bitsandbytes Linear4bit or spiel NF4Weight, "
                            f"got {type(linear).__name__}")
        k = resolve_num_deltas(self.in_features * self.out_features, num_deltas, density,
                               name=f"SparseDeltaLinear.from_linear({type(linear).__name__})")
        self._setup_deltas(k, values_dtype, generator)
        if isinstance(linear, nn.Module):
            # kept (unregistered) so spiel.nn.restore can put the very same module back
            self.__dict__["_spiel_original"] = linear
        return self

    def _setup_base(self, in_features: int, out_features: int, weight, bias) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.__dict__["_spiel_original"] = None
        self.__dict__["_nf4"] = None
        self.__dict__["_nf4_meta"] = None
        if isinstance(weight, NF4Weight):
            self._base_kind = "nf4"
            self.register_buffer("weight_packed", weight.packed)
            self.register_buffer("weight_absmax", weight.absmax)
            self.register_buffer("weight_nested_absmax", weight.nested_absmax)
            self.register_buffer("weight_nested_code", weight.nested_code)
            self.__dict__["_nf4_meta"] = (tuple(weight.shape), weight.blocksize, weight.dtype, weight.nested_offset)
            self.__dict__["_nf4"] = weight
            self.__dict__["weight"] = weight
            self.__dict__["_spiel_weight_requires_grad"] = False
        else:
            self._base_kind = "bnb" if _is_params4bit(weight) else "dense"
            if not isinstance(weight, nn.Parameter):
                weight = nn.Parameter(weight, requires_grad=False)
            self.__dict__["_spiel_weight_requires_grad"] = weight.requires_grad
            weight.requires_grad_(False)
            self.weight = weight
        self.bias = bias
        self._refresh_nf4()

    def _setup_deltas(self, k: int, values_dtype: torch.dtype, generator) -> None:
        if values_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values_dtype must be one of float32, bfloat16, float16, got {values_dtype}")
        device = self.weight.device
        numel = self.in_features * self.out_features
        self.register_buffer("indices", random_indices(numel, k, generator=generator, device=device))
        self.values = nn.Parameter(torch.zeros(k, dtype=values_dtype, device=device))
        self.register_buffer("candidates", None, persistent=False)
        self.candidate_values: Optional[torch.Tensor] = None
        self.gradient_probe: Optional[Callable] = None
        # opt-in: the delta gradient from fp8 (e4m3) operands (spiel.ops.sddmm_fp8; Hopper tensor cores)
        self.fp8_weight_grad: bool = False
        self.register_buffer("sddmm_plan", None, persistent=False)
        # the k original weight entries while merged in place (see merge_), else None
        self.register_buffer("merge_saved", None, persistent=False)
        # merged in place *for training* (merge_(train=True)): the forward refreshes the k merged entries
        # from values and the op runs on the weight as is, taking only the delta gradient
        self.train_merged: bool = False
        self._merged_written: Optional[tuple] = None  # _merged_key() at the last write of the merged entries
        self._rebuild_plan()

    def _refresh_nf4(self) -> None:
        """(Re)build the NF4Weight view used for compute after the storage moved (``.to``) or was loaded."""
        if self._base_kind == "bnb":
            w = self.weight
            qs = getattr(w, "quant_state", None)
            if qs is None:  # a conversion replaced the Params4bit by a plain Parameter: re-attach the state
                qs = self.__dict__["_bnb_quant_state"]
                w.quant_state = qs
            self.__dict__["_bnb_quant_state"] = qs
            if qs.absmax.device != w.device:
                qs.to(w.device)
            self.__dict__["_nf4"] = NF4Weight.from_bnb(w, qs)
        elif self._base_kind == "nf4":
            cur = self._nf4
            if cur is not None and cur.packed is self.weight_packed and cur.absmax is self.weight_absmax and \
                    cur.nested_absmax is self.weight_nested_absmax and cur.nested_code is self.weight_nested_code \
                    and cur.dtype == self._nf4_meta[2]:
                return  # storage unchanged: keep the very NF4Weight object
            shape, blocksize, dtype, offset = self._nf4_meta
            nf4 = NF4Weight(self.weight_packed, self.weight_absmax, shape, blocksize, dtype,
                            self.weight_nested_absmax, self.weight_nested_code, offset)
            self.__dict__["_nf4"] = nf4
            self.__dict__["weight"] = nf4

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def num_deltas(self) -> int:
        return self.indices.numel()

    @property
    def density(self) -> float:
        return self.indices.numel() / (self.in_features * self.out_features)

    @property
    def is_quantized(self) -> bool:
        """True for an NF4 base (bitsandbytes or spiel)."""
        return self._base_kind != "dense"

    @property
    def merged(self) -> bool:
        """True while the delta is merged into a dense weight in place (see :meth:`merge_`)."""
        return self.merge_saved is not None

    @property
    def compute_weight(self):
        """What the op computes with: the dense weight or the :class:`NF4Weight` view."""
        return self._nf4 if self._nf4 is not None else self.weight

    @property
    def base_dtype(self) -> torch.dtype:
        return self._nf4.dtype if self._nf4 is not None else self.weight.dtype

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.merge_saved is not None and not self.train_merged:
            return F.linear(input, self.weight, self.bias)  # merged for inference: W + delta, no delta gradient
        if not isinstance(input, torch.Tensor) or not input.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {getattr(input, 'dtype', type(input))}")
        if input.shape[-1] != self.in_features:
            raise ValueError(f"input must have last dimension {self.in_features} (in_features), "
                             f"got {tuple(input.shape)}")
        if input.device != self.indices.device:
            raise ValueError(f"input is on {input.device} but the layer is on {self.indices.device}")
        probe = self.gradient_probe
        if self.train_merged:
            self._refresh_merged_entries()
        # the layer holds the op's contract (shapes and dtypes fixed here, indices validated at every index
        # update): skip the functional wrapper's checks, ~40 us of Python per call on a launch-bound step
        if probe is not None:
            bound = functools.partial(probe, self)
            bound.gathers_delta_gradient = getattr(probe, "gathers_delta_gradient", False)
            probe = bound
        return apply_sparse_delta_linear(
            input, self.compute_weight, self.indices, self.values, self.bias, self.candidates,
            self.candidate_values, self.sddmm_plan, probe, self.fp8_weight_grad, self.train_merged)

    def extra_repr(self) -> str:
        base = {"bnb": "nf4(bnb)", "nf4": "nf4"}.get(self._base_kind) or str(self.weight.dtype).replace("torch.", "")
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"num_deltas={self.num_deltas}, density={self.density:.4g}, weight={base}, "
             f"values_dtype={str(self.values.dtype).replace('torch.', '')}")
        if self.candidates is not None:
            s += f", candidates={self.candidates.numel()}"
        if self.merged:
            s += ", merged=True" + (" (training)" if self.train_merged else "")
        return s

    def reset_parameters(self) -> None:
        """Zero the deltas (the frozen base weight and the bias are left untouched)."""
        if "values" in self._parameters:
            with torch.no_grad():
                self.values.zero_()

    # ---- index updates (the layer contract) ------------------------------------------------------------
    def _rebuild_plan(self) -> None:
        """Rebuild ``sddmm_plan`` for ``indices`` (plus ``candidates`` while set); see :func:`rebuild_sddmm_plans`."""
        rebuild_sddmm_plans([self])

    def _plan_indices(self) -> torch.Tensor:
        return self.indices if self.candidates is None else torch.cat([self.indices, self.candidates])

    def _normalise_indices(self, indices: torch.Tensor, what: str, validate: bool = True) -> torch.Tensor:
        numel = self.in_features * self.out_features
        if validate:
            check_index_values(indices, numel, what=what)
        elif not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point() \
                or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{what} must be a 1-D integer tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)} of shape "
                            f"{tuple(getattr(indices, 'shape', ()))}")
        return indices.detach().to(device=self.indices.device, dtype=index_dtype_for(numel)).contiguous()

    def _overlap(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether sorted ``a`` and sorted ``b`` share an element (host sync)."""
        if a.numel() == 0 or b.numel() == 0:
            return False
        pos = torch.searchsorted(a, b).clamp_(max=a.numel() - 1)
        return bool((a[pos] == b).any())

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor, values: Optional[torch.Tensor] = None, *,
                    validate: bool = True, rebuild_plan: bool = True) -> None:
        """Replace the active indices (and values) in place; rebuild ``sddmm_plan``.

        ``indices`` is validated once here (1-D integer, sorted, unique, in range: a host sync) and stored as
        int32/int64 by the weight size. ``values`` (same length; cast to ``values.dtype``) defaults to: the
        current value at positions that stay active, 0 at new ones. ``values`` keeps its Parameter identity
        (``.data`` replaced) and its ``.grad`` is reset to None. Fails while merged, and when candidates are
        set that the new indices overlap (call :meth:`clear_candidates` first).

        ``validate=False`` is the trusted path for callers that guarantee the indices are sorted, unique, in
        range and disjoint from the candidates (e.g. SpielScheduler): it skips those value checks and their host
        syncs (shapes and dtypes are still checked). ``rebuild_plan=False`` leaves ``sddmm_plan`` stale: only for
        a caller that calls :func:`rebuild_sddmm_plans` on the layer before its next backward (one host sync for
        many layers instead of one each).
        """
        if self.train_merged:
            # merged for training: put the original entries back, move the indices, merge again (all O(k))
            self.unmerge_()
            try:
                self.set_indices(indices, values, validate=validate, rebuild_plan=rebuild_plan)
            finally:
                self.merge_(train=True)
            return
        if self.merged:
            raise RuntimeError("set_indices on a merged SparseDeltaLinear: unmerge it first")
        if not validate and values is not None and isinstance(indices, torch.Tensor) and indices.dim() == 1 \
                and indices.shape == self.indices.shape and not indices.is_floating_point() \
                and indices.dtype != torch.bool and isinstance(values, torch.Tensor) and values.is_floating_point() \
                and values.shape == indices.shape:
            # trusted, same k: copy straight into the buffers (the casts happen inside copy_); set_indices_many
            # is this branch for many layers: keep the two in step
            self.indices.copy_(indices.detach())
            self.values.data.copy_(values.detach())
            self.values.grad = None
            if rebuild_plan:
                self._rebuild_plan()
            return
        idx = self._normalise_indices(indices, "indices", validate)
        k = idx.numel()
        old_vals = self.values.data
        if values is None:
            new_vals = torch.zeros(k, dtype=old_vals.dtype, device=old_vals.device)
            old = self.indices
            if old.numel() and k:
                pos = torch.searchsorted(old, idx).clamp_(max=old.numel() - 1)
                keep = old[pos] == idx
                new_vals = torch.where(keep, old_vals[pos], new_vals)
        else:
            if not isinstance(values, torch.Tensor) or not values.is_floating_point():
                raise TypeError(f"values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}")
            if values.dim() != 1 or values.numel() != k:
                raise ValueError(f"values must be 1-D with {k} elements (one per index), "
                                 f"got shape {tuple(values.shape)}")
            new_vals = torch.empty(k, dtype=old_vals.dtype, device=old_vals.device)
            new_vals.copy_(values.detach())
        if validate and self.candidates is not None and self._overlap(idx, self.candidates):
            raise ValueError("the new indices overlap the current candidates: call clear_candidates() first")
        if idx.shape == self.indices.shape:
            self.indices.copy_(idx)  # same tensor: no recompilation under torch.compile
            self.values.data.copy_(new_vals)
        else:
            self.indices = idx
            self.values.data = new_vals
        self.values.grad = None
        if rebuild_plan:
            self._rebuild_plan()

    @torch.no_grad()
    def set_candidates(self, candidates: torch.Tensor, *, validate: bool = True, rebuild_plan: bool = True) -> None:
        """Start accumulating the delta gradient at ``candidates`` (sorted, unique, disjoint from ``indices``).

        Creates ``candidate_values``: an fp32 [c] zero leaf requiring grad (not a Parameter; one broadcast zero,
        never read) whose ``.grad``, an fp32 [c] zero buffer of its own, accumulates the gradient at the
        candidates in place on every backward until :meth:`clear_candidates` (or until the caller zeroes it).
        ``validate=False``: the caller guarantees sorted, unique, in range and disjoint from ``indices``; the
        value checks and their host syncs are skipped. ``rebuild_plan=False``: as in :meth:`set_indices`.
        """
        cand = self._normalise_indices(candidates, "candidates", validate)
        if validate and self._overlap(self.indices, cand):
            raise ValueError("candidates must be disjoint from the active indices")
        self.candidates = cand
        # The values at the candidates are zero and never read: one broadcast zero instead of c floats. The
        # gradient buffer exists up front so that autograd adds into it in place: left to autograd, the first
        # backward would keep the candidates' slice of that backward's sddmm output as .grad, and with it the
        # whole (k + c)-float buffer it shares with the values' gradient, alive for the whole window (4 B per
        # active delta: ~0.6 GiB on the 7B shape).
        zero = torch.zeros((), dtype=torch.float32, device=cand.device)
        self.candidate_values = zero.expand(cand.numel()).requires_grad_()
        self.candidate_values.grad = torch.zeros(cand.numel(), dtype=torch.float32, device=cand.device)
        if rebuild_plan:
            self._rebuild_plan()

    @torch.no_grad()
    def clear_candidates(self, *, rebuild_plan: bool = True) -> None:
        """Drop the candidates (and ``candidate_values`` with its gradient); rebuild ``sddmm_plan``.

        ``rebuild_plan=False`` leaves the plan stale: only for a caller that calls :meth:`set_indices` right
        after (which rebuilds it), saving one plan build, or :func:`rebuild_sddmm_plans`.
        """
        self.candidates = None
        self.candidate_values = None
        if rebuild_plan:
            self._rebuild_plan()

    # ---- dense views (tests, export) ---------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense delta ``scatter(indices, values)`` [out, in] (``dtype`` default ``values.dtype``)."""
        dtype = dtype or self.values.dtype
        d = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=self.values.device)
        d[self.indices.long()] = self.values.detach().to(dtype)
        return d.view(self.out_features, self.in_features)

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A new dense ``W + delta`` [out, in]: fp32 sum, one rounding, in the base's dtype (NF4: its compute
        dtype) unless ``dtype`` is given."""
        vals = self.values.detach()
        if self._nf4 is not None:
            return ops.nf4_dequantize_add_delta(self._nf4, self.indices, vals, dtype=dtype or self._nf4.dtype)
        if self.merged:
            if self.train_merged:
                self._refresh_merged_entries()  # values may have moved since the last forward
            out = self.weight.detach().clone()
        else:
            out = ops.merge_delta(self.weight.detach(), self.indices, vals)
        return out if dtype is None else out.to(dtype)

    @torch.no_grad()
    def merge_(self, train: bool = False) -> None:
        """Write ``W + delta`` (fp32 sum rounded to W's dtype) into the dense weight's storage in place.

        The k original weight entries are saved first (O(k) memory, buffer ``merge_saved``) so :meth:`unmerge_`
        restores W bit-exactly; ``values`` are kept. Dense bases only (``spiel.nn.merge`` handles NF4).

        ``train=False`` (inference/export): the forward is a plain ``F.linear`` (no delta gradient).
        ``train=True``: training goes on merged. A forward rewrites the k merged entries from ``values`` (O(k))
        when they changed since the last write (version counters: change ``values`` in place or through an
        optimizer, not through ``values.data``), and the GEMMs of forward and backward use the weight as is, so
        a step runs no merge kernel
        (three out x in merges per layer per step otherwise, with gradient checkpointing); ``values`` and
        candidates get the same gradients as unmerged, bit for bit. ``state_dict`` still holds the original
        weight, and ``set_indices`` works (it unmerges and merges the O(k) entries). Never hand the merged
        weight to anything else while training: it is W + delta.
        """
        if self._base_kind != "dense":
            raise TypeError("merge_ works on dense weights only; use spiel.nn.merge(model) for NF4 layers")
        if self.merged:
            if bool(train) != self.train_merged:
                raise RuntimeError(f"already merged with train={self.train_merged}: unmerge_() first")
            return
        w = self.weight.data
        if not w.is_contiguous():
            raise ValueError("merge_ needs a contiguous weight")
        self.merge_saved = w.view(-1)[self.indices]
        self.train_merged = bool(train)
        self._write_merged_entries()  # only the k entries change: O(k), not a pass over W

    def _merged_key(self) -> tuple:
        # what the merged entries were written from: any in-place change (the optimizer's step bumps the
        # values' version counter), a swapped tensor (set_indices, .to()) or an outside write to the weight
        # Parameter (load_state_dict's copy_) makes the key differ. Host-side only: no sync.
        v, i, w = self.values, self.indices, self.weight
        return (v.data_ptr(), v._version, i.data_ptr(), i._version, w.data_ptr(), w._version)

    def _refresh_merged_entries(self) -> None:
        """Rewrite the k merged entries if values, indices or the weight changed since the last write (an
        optimizer step, an index update): once per step, so a checkpoint's recompute finds them current."""
        if torch.compiler.is_compiling() or self._merged_key() != self._merged_written:
            self._write_merged_entries()

    @torch.no_grad()
    def _write_merged_entries(self) -> None:
        """weight[indices] = round(saved + values) with the fp32 (fp64 for fp64 weights) sum of merge_delta.
        Runs at the forwards of a layer merged for training whose values changed: a few O(k) launches, no
        int64 copy of indices."""
        w = self.weight.data.view(-1)  # .data: the write does not bump the Parameter's version counter
        acc = torch.promote_types(torch.float32, w.dtype)
        merged = torch.add(self.merge_saved.to(acc), self.values.detach().to(acc))  # never in place: saved stays
        w.index_put_((self.indices,), merged.to(w.dtype))
        self._merged_written = self._merged_key()

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Undo :meth:`merge_` exactly (the saved original entries are written back)."""
        if not self.merged:
            return
        self.weight.data.view(-1).index_put_((self.indices,), self.merge_saved)
        self.merge_saved = None
        self.train_merged = False
        self._merged_written = None

    # ---- device moves and state_dict --------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        if self._base_kind != "nf4":
            result = super()._apply(fn, recurse)
        else:
            # a spiel NF4Weight's tensors only follow device moves: a dtype cast (model.to(torch.bfloat16))
            # must not touch the fp32 absmax / code tables; it changes the NF4 compute dtype instead
            nf4 = self._nf4
            probe = fn(torch.empty(0, dtype=nf4.dtype, device=nf4.device))
            held = {name: self._buffers[name] for name in _NF4_BUFFERS}
            for name in _NF4_BUFFERS:
                self._buffers[name] = None
            try:
                result = super()._apply(fn, recurse)
            finally:
                for name, t in held.items():
                    self._buffers[name] = None if t is None else t.to(probe.device)
            shape, blocksize, _, offset = self._nf4_meta
            self.__dict__["_nf4_meta"] = (shape, blocksize, probe.dtype, offset)
        self._refresh_nf4()
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.train_merged:  # checkpoints hold the original weight (a copy with the k entries put back)
            w = self.weight.detach().clone()
            w.view(-1).index_put_((self.indices,), self.merge_saved)
            destination[prefix + "weight"] = w
        if self._base_kind == "bnb":
            # bitsandbytes Linear4bit's layout: weight, bias, then the quant state under weight.*
            for key, v in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.train_merged:  # load into the unmerged layer, then merge for training again
            self.unmerge_()
            try:
                self._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                           unexpected_keys, error_msgs)
            finally:
                self.merge_(train=True)
            return
        ik, vk = prefix + "indices", prefix + "values"
        new_idx, new_val = state_dict.get(ik), state_dict.get(vk)
        numel = self.in_features * self.out_features
        resized = False
        if new_idx is not None or new_val is not None:
            try:
                if self.merged:
                    raise ValueError(f"{prefix or 'layer'}: load_state_dict into a merged layer; unmerge it first")
                if new_idx is not None:
                    check_index_values(new_idx, numel, what=f"{ik} (state_dict)")
                if new_idx is not None and new_val is not None and new_idx.shape != new_val.shape:
                    raise ValueError(f"{ik} and {vk} have different lengths: {tuple(new_idx.shape)} vs "
                                     f"{tuple(new_val.shape)}")
                k_in = (new_idx if new_idx is not None else new_val).numel()
                if k_in != self.num_deltas and (new_idx is None or new_val is None):
                    raise ValueError(f"{prefix or 'layer'}: loading {k_in} deltas into a layer of {self.num_deltas} "
                                     f"needs both {ik} and {vk}")
                if self.candidates is not None:
                    self.clear_candidates()
                if k_in != self.num_deltas:
                    # resize consistently (values keeps its Parameter identity); the default loader then
                    # copies into tensors of the right shape
                    self.indices = new_idx.detach().to(device=self.indices.device, dtype=index_dtype_for(numel))
                    self.values.data = new_val.detach().to(device=self.values.device, dtype=self.values.dtype)
                    self.values.grad = None
                    resized = True
            except (ValueError, TypeError) as exc:
                error_msgs.append(str(exc))
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._base_kind == "bnb":
            self._load_bnb_quant_state(state_dict, prefix, unexpected_keys)
        if new_idx is not None or resized:
            if self.indices.dtype != index_dtype_for(numel):
                self.indices = self.indices.to(index_dtype_for(numel))
            self._rebuild_plan()
        self._refresh_nf4()

    def _load_bnb_quant_state(self, state_dict, prefix, unexpected_keys) -> None:
        wp = prefix + "weight."
        qkeys = [k for k in state_dict if k.startswith(wp)]
        if not qkeys:
            return
        for k in qkeys:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        from bitsandbytes.functional import QuantState

        qs = QuantState.from_dict({k[len(wp):]: state_dict[k] for k in qkeys}, device=self.weight.device)
        self.weight.quant_state = qs
        self.__dict__["_bnb_quant_state"] = qs


@torch.no_grad()
def rebuild_sddmm_plans(layers, *, balance: bool = True) -> None:
    """Rebuild the ``sddmm_plan`` of each :class:`SparseDeltaLinear` in ``layers`` for its indices (plus its
    candidates while set): which layers need one is decided for all of them with one device-to-host read
    (``needs_plan_many``), and those plans are built together with one more (``sddmm_plan.build_plans``).

    Where both GPU backends would run the vendor GEMM over row bands (``sddmm`` without a plan runs exactly
    that) the layer keeps no plan: ~3 int32 per delta saved and the build (the bulk of an index update at
    LoRA-like densities) skipped. The index sets are trusted here (validated, or guaranteed by the caller,
    where they were set), so the plan op is called without the public wrapper's value checks.

    ``balance=False`` skips the plans' bank-conflict balancing (``sddmm_plan.balance_plans``): it makes the CUDA
    sparse kernel 2-10% faster but costs ~1 ms per layer (~0.25 s for 224 7B layers at 0.1% density on an
    H100), which only pays back over ~100+ steps; the scheduler's index updates (every 20 steps by default)
    therefore build unbalanced plans.
    """
    layers = list(layers)
    plan_indices = [layer._plan_indices() for layer in layers]
    needed = _plan.needs_plan_many([(idx, layer.out_features, layer.in_features)
                                    for idx, layer in zip(plan_indices, layers)])
    todo = [(layer, idx.contiguous()) for layer, idx, need in zip(layers, plan_indices, needed) if need]
    # built together: batched over layers of one shape and k, one host read, one bank-conflict balancing pass
    plans = _plan.build_plans([(idx, layer.out_features, layer.in_features) for layer, idx in todo], balance=balance)
    # no full plan: cuBLAS bands, or on an H100 the wgmma dense_tile through a row plan (O(out) int32; sorted
    # indices only, so not while candidates are set), built together
    rows = [(layer, idx) for layer, idx, need in zip(layers, plan_indices, needed)
            if not need and layer.candidates is None and idx.numel() < 2**31
            and _plan.row_plan_applies(idx.device, layer.out_features, layer.in_features)]
    row_plans = _plan.build_row_plans([(idx, layer.out_features, layer.in_features) for layer, idx in rows])
    new_plans = {id(layer): plan for (layer, _), plan in zip(rows + todo, row_plans + plans)}
    for layer in layers:
        # straight into the buffer dict: nn.Module.__setattr__ costs ~20 us per call, ~5 ms per 7B index update
        layer._buffers["sddmm_plan"] = new_plans.get(id(layer))


@torch.no_grad()
def set_indices_many(layers: Sequence["SparseDeltaLinear"], indices: torch.Tensor, values: torch.Tensor, *,
                     rebuild_plan: bool = True) -> None:
    """``layers[i].set_indices(indices[i], values[i], validate=False, rebuild_plan=False)`` for every i, then one
    :func:`rebuild_sddmm_plans` (``rebuild_plan=True``), with a number of launches independent of the layer count.

    ``indices`` (integer) and ``values`` (floating) are [L, k]; the caller guarantees each row sorted, unique, in
    range and disjoint from the layer's candidates (the trusted path). Layers of k entries on the rows' device
    get the rows copied into their existing ``indices`` buffer and ``values`` storage (through ``.data``, as
    :meth:`SparseDeltaLinear.set_indices` does: the Parameter keeps its identity and version counter) by one cast
    and one foreach copy per dtype, and their ``.grad`` reset to None. Layers merged for training take the same
    copies, between three O(k) launches of their own (their original entries put back, the new positions' saved,
    the new merged entries written; the sums for all of them in one batched add); the others (another k or
    device) go through :meth:`SparseDeltaLinear.set_indices` one by one. No host sync. RuntimeError, before any
    layer changes, when a layer is merged for inference.
    """
    if indices.dim() != 2 or indices.shape != values.shape or indices.shape[0] != len(layers):
        raise ValueError(f"set_indices_many: indices and values must be [len(layers)={len(layers)}, k], got "
                         f"{tuple(indices.shape)} and {tuple(values.shape)}")
    k = indices.shape[1]
    by_index_dtype: Dict[torch.dtype, list] = defaultdict(list)  # dtype -> [(indices buffer, row)]
    by_value_dtype: Dict[torch.dtype, list] = defaultdict(list)  # dtype -> [(values Parameter, row)]
    one_by_one, merged_rows = [], []
    restore: Dict[tuple, list] = defaultdict(list)  # (weight dtype, index dtype) -> [(weight, indices, saved)]
    for row, layer in enumerate(layers):
        if layer.merge_saved is not None and not layer.train_merged:
            raise RuntimeError("set_indices on a merged SparseDeltaLinear: unmerge it first")
    for row, layer in enumerate(layers):
        idx, vals = layer.indices, layer.values  # nn.Module.__getattr__ once each: this loop is host-bound
        if idx.shape == vals.shape == (k,) and idx.device == indices.device and vals.device == values.device:
            saved = layer.merge_saved
            if saved is not None:  # trained merged: its original entries go back first (below, all at once)
                w = layer.weight.data
                restore[(w.dtype, idx.dtype)].append((w, idx, saved))
                merged_rows.append(row)
            by_index_dtype[idx.dtype].append((idx, row))
            by_value_dtype[vals.dtype].append((vals, row))
        else:
            one_by_one.append(row)
    for items in restore.values():  # one launch per 64 layers instead of an index_put_ each
        torch.ops.spiel.index_put_many_([w for w, _, _ in items], [i for _, i, _ in items], [v for _, _, v in items])
    for row in one_by_one:  # (a layer trained merged unmerges, sets and merges itself)
        layers[row].set_indices(indices[row], values[row], validate=False, rebuild_plan=False)
    # per dtype: one cast of the whole batch and one foreach copy (copy_ would cast row by row)
    for dtype, items in by_index_dtype.items():
        rows = indices.to(dtype).unbind(0)
        torch._foreach_copy_([idx for idx, _ in items], [rows[r] for _, r in items])
    for dtype, items in by_value_dtype.items():
        rows = values.to(dtype).unbind(0)
        torch._foreach_copy_([vals.data for vals, _ in items], [rows[r] for _, r in items])
        for vals, _ in items:
            vals.grad = None
    if merged_rows:
        _merge_many([layers[row] for row in merged_rows])
    if rebuild_plan:
        rebuild_sddmm_plans(layers)


#: Most entries one batched write of merged entries works on (its temporaries: ~14 B per entry).
MERGED_WRITE_BATCH_ELEMENTS = 1 << 23


@torch.no_grad()
def refresh_merged_entries(layers) -> None:
    """Rewrite the merged entries of every :class:`SparseDeltaLinear` in ``layers`` trained merged whose values,
    indices or weight changed since its last write (an optimizer step), batched: the same ``round(saved +
    values)`` as the layer's forward would write (bit for bit), in a few launches per ~8M entries instead of four
    per layer (~900 launches per step at 7B, on a host-bound step). Layers not trained merged, or current, are
    skipped; a later forward finds the refreshed layers current. ``SpielScheduler.step`` calls it."""
    _write_merged_many([layer for layer in layers
                        if isinstance(layer, SparseDeltaLinear) and layer.train_merged
                        and layer.merge_saved is not None and layer._merged_key() != layer._merged_written])


def _write_merged_many(layers: Sequence["SparseDeltaLinear"]) -> None:
    """weight[indices] = round(saved + values) for layers trained merged, as
    :meth:`SparseDeltaLinear._write_merged_entries` computes it: one concatenated add and one
    ``index_put_many_`` per batch of layers with one (weight, values, index) dtype and device."""
    key = lambda layer: (layer.weight.dtype, layer.values.dtype, layer.indices.dtype, layer.indices.device)  # noqa: E731
    for batch in group_batches(layers, key, lambda layer: layer.indices.numel(), MERGED_WRITE_BATCH_ELEMENTS):
        weights = [layer.weight.data for layer in batch]
        idxs = [layer.indices for layer in batch]
        acc = torch.promote_types(torch.float32, weights[0].dtype)
        merged = torch.add(torch.cat([layer.merge_saved for layer in batch]).to(acc),
                           torch.cat([layer.values.detach() for layer in batch]).to(acc)).to(weights[0].dtype)
        torch.ops.spiel.index_put_many_(weights, idxs, list(merged.split([idx.numel() for idx in idxs])))
        for layer in batch:
            layer.__dict__["_merged_written"] = layer._merged_key()  # a plain attribute: no Module.__setattr__


@torch.no_grad()
def _merge_many(layers: Sequence["SparseDeltaLinear"]) -> None:
    """The merge for training of layers whose weight holds its original entries again (after new indices): the
    original entries at the new indices are saved (one ``index_select_many`` per dtype, into each layer's own
    buffer) and ``round(saved + values)`` written there (:func:`_write_merged_many`)."""
    groups: Dict[tuple, list] = defaultdict(list)
    for layer in layers:
        w, idx = layer.weight.data, layer.indices
        saved = layer.merge_saved
        if saved is None or saved.shape != idx.shape or saved.dtype != w.dtype or saved.device != w.device:
            layer.merge_saved = saved = torch.empty(idx.shape, dtype=w.dtype, device=w.device)
        groups[(w.dtype, idx.dtype, w.device)].append((w, idx, saved))
    for members in groups.values():
        torch.ops.spiel.index_select_many([w for w, _, _ in members], [i for _, i, _ in members],
                                          [v for _, _, v in members])
    _write_merged_many(layers)
