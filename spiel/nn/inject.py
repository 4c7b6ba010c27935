"""Put ``SparseDeltaLinear`` layers into a model in place, and take them out again.

- :func:`inject` replaces matching ``nn.Linear`` / bitsandbytes ``Linear4bit`` modules by
  :class:`SparseDeltaLinear` layers sharing their weights, with a budget of deltas per module;
- :func:`restore` puts the original modules back (deltas dropped);
- :func:`merge` / :func:`unmerge` fold the deltas into the weights (inference/export) and back;
- :func:`merged_state_dict` gives a plain state_dict with the deltas merged, without touching the model.
"""
from __future__ import annotations

import itertools
import re
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..quant.nf4 import NF4Weight
from .linear import (
    SparseDeltaLinear,
    _checked_params4bit,
    _FLOAT_DTYPES,
    is_bnb_linear4bit,
    resolve_num_deltas,
)

__all__ = ["inject", "restore", "merge", "unmerge", "merged_state_dict", "sparse_delta_modules",
           "split_budget"]

Target = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
_SPIEL_KEYS = ("indices", "values", "weight_packed", "weight_absmax", "weight_nested_absmax", "weight_nested_code")


def sparse_delta_modules(model: nn.Module) -> "OrderedDict[str, SparseDeltaLinear]":
    """The model's :class:`SparseDeltaLinear` layers by qualified name (each layer once)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear))


def _is_linear_like(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_bnb_linear4bit(module)) and not isinstance(module, SparseDeltaLinear)


def _shape(module: nn.Module) -> Tuple[int, int]:
    return int(module.out_features), int(module.in_features)


def _output_embedding_ids(model: nn.Module) -> set:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return set()
    try:
        out = get()
    except Exception:  # noqa: BLE001  (models without output embeddings raise various errors)
        return set()
    return {id(out)} if out is not None else set()


def _match(model: nn.Module, target_modules: Target,
           dict_names: Optional[Sequence[str]]) -> List[Tuple[str, nn.Module]]:
    linears = [(n, m) for n, m in model.named_modules() if n and _is_linear_like(m)]
    if target_modules is None and dict_names is not None:
        wanted = set(dict_names)
        return [(n, m) for n, m in linears if n in wanted]
    if target_modules is None or target_modules == "all-linear":
        skip = _output_embedding_ids(model)
        return [(n, m) for n, m in linears if id(m) not in skip]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules is not a valid regex: {target_modules!r} ({exc})") from None
        return [(n, m) for n, m in linears if pattern.fullmatch(n)]
    if callable(target_modules):
        return [(n, m) for n, m in linears if target_modules(n, m)]
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        suffixes = list(target_modules)
        bad = [s for s in suffixes if not isinstance(s, str) or not s]
        if bad:
            raise TypeError(f"target_modules must hold non-empty strings (name suffixes), got {bad!r}")
        return [(n, m) for n, m in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    raise TypeError("target_modules must be None/'all-linear', a regex string, a list of name suffixes or a "
                    f"callable (name, module) -> bool, got {type(target_modules).__name__}")


def _describe_no_match(model: nn.Module, target_modules: Target) -> str:
    names = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
    injected = [n for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    msg = f"target_modules={target_modules!r} matches no nn.Linear / Linear4bit module"
    if isinstance(target_modules, str) and target_modules != "all-linear":
        msg += (" (a string is a regex matched against the full module name with re.fullmatch; pass a list for "
                "name suffixes)")
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        msg += f"; linear modules in the model: {shown}"
    else:
        msg += "; the model has no (un-injected) linear modules"
    if injected:
        msg += f"; already injected: {len(injected)} module(s)"
    return msg


def split_budget(num_tunable: int, sizes: Sequence[int]) -> List[int]:
    """Split ``num_tunable`` over modules in proportion to their sizes, exactly (largest remainder).

    ``k_i = floor(T * n_i / N)`` plus one for the ``T - sum floor`` modules with the largest remainders (ties
    by order), so ``sum k_i == T`` and ``k_i <= n_i``.
    """
    total = sum(sizes)
    if num_tunable > total:
        raise ValueError(f"num_tunable={num_tunable} is more than the {total} weights of the targeted modules")
    quotas = [num_tunable * n // total for n in sizes]
    rems = [num_tunable * n % total for n in sizes]
    left = num_tunable - sum(quotas)
    for i in sorted(range(len(sizes)), key=lambda i: (-rems[i], i))[:left]:
        quotas[i] += 1
    return quotas


def _budget(matched: List[Tuple[str, nn.Module]], density, num_tunable, num_deltas) -> Dict[str, int]:
    given = [x is not None for x in (density, num_tunable, num_deltas)]
    if sum(given) != 1:
        raise ValueError("give exactly one of density=, num_tunable= or num_deltas=")
    sizes = {n: _shape(m)[0] * _shape(m)[1] for n, m in matched}
    if density is not None:
        return {n: resolve_num_deltas(sizes[n], density=density, name=n) for n, _ in matched}
    if num_tunable is not None:
        if isinstance(num_tunable, bool) or not isinstance(num_tunable, int):
            raise TypeError(f"num_tunable must be an int, got {type(num_tunable).__name__}")
        if num_tunable < 1:
            raise ValueError(f"num_tunable must be >= 1, got {num_tunable}")
        ks = split_budget(num_tunable, [sizes[n] for n, _ in matched])
        return {n: k for (n, _), k in zip(matched, ks)}
    if isinstance(num_deltas, Mapping):
        names = [n for n, _ in matched]
        missing = [n for n in names if n not in num_deltas]
        if missing:
            raise ValueError(f"num_deltas has no count for the targeted module(s) {missing}")
        unknown = [n for n in num_deltas if n not in sizes]
        if unknown:
            raise ValueError(f"num_deltas names module(s) that are not targeted linear modules of the model: {unknown}")
        return {n: resolve_num_deltas(sizes[n], num_deltas=num_deltas[n], name=n) for n in names}
    return {n: resolve_num_deltas(sizes[n], num_deltas=num_deltas, name=n) for n, _ in matched}


def _precheck(name: str, module: nn.Module) -> None:
    """Fail before anything is replaced if a targeted module cannot be wrapped."""
    if is_bnb_linear4bit(module):
        try:
            _checked_params4bit(module)
        except ValueError as exc:
            raise ValueError(f"module {name!r}: {exc}") from None
        return
    w = module.weight
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES or w.dim() != 2 or \
            type(w).__name__ in ("Params4bit", "Int8Params"):
        raise TypeError(f"module {name!r} ({type(module).__name__}, weight dtype {getattr(w, 'dtype', None)}) is not "
                        "supported: SparseDeltaLinear wraps nn.Linear with a bf16/fp16/fp32 weight or bitsandbytes "
                        "Linear4bit (nf4)")


def _replace(model: nn.Module, mapping: Dict[int, nn.Module]) -> None:
    """Swap every occurrence (under any parent) of each module ``id -> new``."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                setattr(parent, child_name, mapping[id(child)])


def _wrap_modules(model: nn.Module, counts: Dict[str, int], values_dtype: Mapping[str, torch.dtype],
                  generator: Optional[torch.Generator], freeze: bool) -> "OrderedDict[str, SparseDeltaLinear]":
    modules = dict(model.named_modules())
    for name in counts:
        _precheck(name, modules[name])
    new: "OrderedDict[str, SparseDeltaLinear]" = OrderedDict()
    mapping: Dict[int, nn.Module] = {}
    for name, k in counts.items():
        old = modules[name]
        layer = SparseDeltaLinear.from_linear(old, num_deltas=k, values_dtype=values_dtype[name], generator=generator)
        layer.train(old.training)
        mapping[id(old)] = layer
        new[name] = layer
    _replace(model, mapping)
    if freeze:
        _freeze_all_but_deltas(model)
    return new


def _freeze_all_but_deltas(model: nn.Module) -> None:
    trainable = {id(m.values) for m in model.modules() if isinstance(m, SparseDeltaLinear)}
    frozen = model.__dict__.setdefault("_spiel_frozen", [])
    for name, p in model.named_parameters():
        if id(p) not in trainable and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    for m in model.modules():
        if isinstance(m, SparseDeltaLinear):
            m.values.requires_grad_(True)


def inject(model: nn.Module, target_modules: Target = None, *, density: Optional[float] = None,
           num_tunable: Optional[int] = None, num_deltas: Union[None, int, Mapping[str, int]] = None,
           freeze: bool = True, values_dtype: torch.dtype = torch.float32,
           seed: int = 0) -> "OrderedDict[str, SparseDeltaLinear]":
    """Replace matching linear modules of ``model`` in place by :class:`SparseDeltaLinear` layers.

    Args:
        model: any ``nn.Module`` (e.g. a transformers model, also one loaded in 4-bit with bitsandbytes).
        target_modules: which modules (among ``nn.Linear`` and bitsandbytes ``Linear4bit``, not yet
            injected) to replace: a list of name suffixes (``["q_proj", "v_proj"]`` matches
            ``model.layers.0.self_attn.q_proj``), a regex string matched against the full qualified name
            (``re.fullmatch``), a callable ``(name, module) -> bool``, or None / ``"all-linear"``: every
            linear module except the output embedding (``model.get_output_embeddings()``, e.g. ``lm_head``).
            With ``num_deltas`` as a dict and no ``target_modules``, the dict's names are the targets.
        density: k_i = round(density * out_i * in_i) (at least 1) per module; density in (0, 1].
        num_tunable: a global budget split over the targets in proportion to out_i * in_i (the paper's rule),
            with largest-remainder rounding so the total is exactly ``num_tunable``.
        num_deltas: an int (the same k for each module) or a dict ``{qualified name: k}`` covering exactly the
            targeted modules.
        freeze: set ``requires_grad=False`` on every parameter of the model except the deltas (``values``).
            The wrapped layers' weights are frozen in any case.
        values_dtype: dtype of the deltas (fp32 default).
        seed: seeds the ``torch.Generator`` drawing the initial indices (uniform without replacement, in module
            order), so the same model and arguments give the same indices.

    Returns:
        dict: qualified name -> new :class:`SparseDeltaLinear`, in module order. Each new layer shares the
        original module's weight (and bias) storage and keeps the original module for :func:`restore`.
        A module registered under several names is replaced everywhere by one layer.

    Exactly one of ``density``, ``num_tunable``, ``num_deltas`` must be given. Nothing is replaced if any
    argument is invalid or a targeted module cannot be wrapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseDeltaLinear) or _is_linear_like(model):
        raise ValueError("inject replaces submodules in place: wrap a single layer with SparseDeltaLinear.from_linear")
    if values_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"values_dtype must be one of float32, bfloat16, float16, got {values_dtype}")
    dict_names = list(num_deltas) if isinstance(num_deltas, Mapping) else None
    matched = _match(model, target_modules, dict_names)
    if not matched:
        raise ValueError(_describe_no_match(model, target_modules))
    counts = _budget(matched, density, num_tunable, num_deltas)
    generator = torch.Generator().manual_seed(int(seed))
    return _wrap_modules(model, counts, {n: values_dtype for n in counts}, generator, freeze)


def _plain_linear(layer: SparseDeltaLinear) -> nn.Linear:
    """An nn.Linear sharing ``layer``'s dense weight and bias (for layers built without an original)."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight = layer.weight
    lin.bias = layer.bias
    return lin


def restore(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Undo :func:`inject` in place: put the original modules back (they share the same weight storage, the
    deltas are dropped), unmerging first where merged, and make trainable again the parameters ``inject``
    froze. Returns name -> restored module. Layers built directly with ``SparseDeltaLinear(...)`` (no
    original) become a plain ``nn.Linear`` sharing their weight."""
    unmerge(model)
    layers = sparse_delta_modules(model)
    for name, layer in layers.items():
        if layer._spiel_original is None and layer.is_quantized:
            raise TypeError(f"module {name!r} wraps a spiel NF4Weight and has no original module to restore")
    mapping: Dict[int, nn.Module] = {}
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, layer in layers.items():
        layer.unmerge_()
        original = layer._spiel_original if layer._spiel_original is not None else _plain_linear(layer)
        if layer._base_kind != "nf4":
            layer.weight.requires_grad_(layer._spiel_weight_requires_grad)
        mapping[id(layer)] = original
        out[name] = original
    _replace(model, mapping)
    frozen = model.__dict__.pop("_spiel_frozen", [])
    params = dict(model.named_parameters())
    for pname in frozen:
        if pname in params:
            params[pname].requires_grad_(True)
    return out


def _linear4bit_from(dense: torch.Tensor, bias, like: Optional[NF4Weight], compute_dtype) -> nn.Module:
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    blocksize = like.blocksize if like is not None else 64
    compress = like.double_quant if like is not None else True
    out_f, in_f = dense.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=compress, quant_type="nf4", device="meta")
    packed, qs = quantize_4bit(dense.contiguous(), blocksize=blocksize, compress_statistics=compress,
                               quant_type="nf4", quant_storage=torch.uint8)
    lin.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=blocksize,
                                   compress_statistics=compress, quant_type="nf4", quant_storage=torch.uint8,
                                   bnb_quantized=True, module=lin)
    lin.quant_state = qs
    lin.bias = bias
    return lin


def merge(model: nn.Module, *, requantize: bool = False, dtype: Optional[torch.dtype] = None,
          train: bool = False) -> "OrderedDict[str, nn.Module]":
    """Fold every layer's delta into its weight (for inference / export); :func:`unmerge` undoes it.

    ``train=True``: merge the dense layers for *training* (:meth:`SparseDeltaLinear.merge_` with
    ``train=True``: no merge kernel in the step, the same gradients) and leave NF4 layers as they are, and
    dense layers whose weight storage is shared with another parameter or buffer of the model (tied weights:
    merging in place would change the other one), with a warning.

    - Dense bases (bf16/fp16/fp32): ``W + delta`` (fp32 sum, one rounding) is written into the weight's own
      storage in place; the k original weight entries are saved (O(k) memory) and ``values`` kept, so
      :func:`unmerge` restores ``W`` bit-exactly. The layer stays a ``SparseDeltaLinear`` whose forward is a
      plain ``F.linear`` while merged (no delta gradient: unmerge before training).
    - NF4 bases: the layer is replaced by a plain ``nn.Linear`` holding the dequantized weight plus delta
      (dtype ``dtype`` or the NF4 compute dtype, usually bf16; frozen; bias shared). ``requantize=True``
      quantizes that back to NF4 (a bitsandbytes ``Linear4bit`` for bitsandbytes bases, a ``SparseDeltaLinear``
      with 0 deltas over a spiel ``NF4Weight`` otherwise) with a warning: it adds a second rounding. The
      replaced ``SparseDeltaLinear`` is kept on the new module so :func:`unmerge` can put it back.

    Returns name -> the module now at that name.
    """
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    mapping: Dict[int, nn.Module] = {}
    warned = False
    uses: Dict[int, int] = {}
    if train:
        for _, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                    model.named_buffers(remove_duplicate=False)):
            if t is not None and t.numel():
                key = t.untyped_storage().data_ptr()
                uses[key] = uses.get(key, 0) + 1
    for name, layer in sparse_delta_modules(model).items():
        if not layer.is_quantized:
            if train and uses.get(layer.weight.untyped_storage().data_ptr(), 0) > 1:
                warnings.warn(f"spiel.nn.merge(train=True): {name}.weight shares its storage with another tensor "
                              "of the model (tied weights); that layer trains unmerged", stacklevel=2)
                continue
            layer.merge_(train=train)
            out[name] = layer
            continue
        if train:
            continue  # NF4 bases cannot hold W + delta: they train unmerged
        dense = layer.merged_weight(dtype)
        if requantize:
            if not warned:
                warnings.warn("spiel.nn.merge(requantize=True): re-quantizing W + delta to NF4 rounds a second time; "
                              "the result differs from the trained model by up to one NF4 step per weight",
                              stacklevel=2)
                warned = True
            if layer._base_kind == "bnb":
                new = _linear4bit_from(dense, layer.bias, layer._nf4, dense.dtype)
            else:
                nf4 = NF4Weight.quantize(dense, blocksize=layer._nf4.blocksize, double_quant=layer._nf4.double_quant)
                new = SparseDeltaLinear.from_linear(nf4, num_deltas=0, bias=layer.bias)
        else:
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            new.weight = nn.Parameter(dense, requires_grad=False)
            new.bias = layer.bias
        new.train(layer.training)
        new.__dict__["_spiel_unmerge"] = layer
        mapping[id(layer)] = new
        out[name] = new
    _replace(model, mapping)
    return out


def unmerge(model: nn.Module) -> "OrderedDict[str, SparseDeltaLinear]":
    """Undo :func:`merge`: dense layers get their original weight entries back (exact); NF4 layers replaced
    by :func:`merge` are swapped back to their ``SparseDeltaLinear``. Returns name -> layer."""
    out: "OrderedDict[str, SparseDeltaLinear]" = OrderedDict()
    mapping: Dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear) and module.merged:
            module.unmerge_()
            out[name] = module
        elif "_spiel_unmerge" in module.__dict__:
            layer = module.__dict__["_spiel_unmerge"]
            mapping[id(module)] = layer
            out[name] = layer
    _replace(model, mapping)
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module, *, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every :class:`SparseDeltaLinear` exported as a plain ``nn.Linear``:
    ``<name>.weight`` = ``W + delta`` (dense; NF4 bases dequantized, in ``dtype`` or the base's dtype),
    ``<name>.bias`` as is, and no spiel keys (``indices``, ``values``) nor NF4 quant-state keys for those
    layers. The model is not modified; a merged weight is allocated per unmerged layer."""
    sd = model.state_dict()
    for name, layer in model.named_modules(remove_duplicate=False):
        if not isinstance(layer, SparseDeltaLinear):
            continue
        p = name + "." if name else ""
        for key in [k for k in sd if k.startswith(p)]:
            local = key[len(p):]
            if local in _SPIEL_KEYS or local.startswith("weight."):
                del sd[key]
        if layer.merged and not layer.train_merged and dtype in (None, layer.weight.dtype):
            sd[p + "weight"] = layer.weight.detach()
        else:
            sd[p + "weight"] = layer.merged_weight(dtype)
    return sd
