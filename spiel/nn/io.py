"""Save and load only the sparse deltas of a model (a small safetensors file).

File layout: one safetensors file with, per injected module ``<name>``, the tensors ``<name>.indices``
(int32/int64) and ``<name>.values``, and in the safetensors metadata under the key ``"spiel"`` a JSON
config::

    {"format": "spiel-deltas", "format_version": 1, "spiel_version": "0.1.0",
     "modules": {"<name>": {"shape": [out, in], "num_deltas": k, "values_dtype": "float32",
                            "quantized": false}, ...}}
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, Union

import torch
import torch.nn as nn

from ..version import __version__
from .inject import _is_linear_like, _shape, _wrap_modules, sparse_delta_modules
from .linear import SparseDeltaLinear, check_index_values

__all__ = ["save_deltas", "load_deltas", "read_deltas"]

FORMAT = "spiel-deltas"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PathLike = Union[str, "os.PathLike[str]"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_deltas(model: nn.Module, path: PathLike) -> None:
    """Write the indices and values of every :class:`SparseDeltaLinear` of ``model`` to ``path``
    (safetensors; see the module docstring for the layout). Nothing else of the model is written."""
    from safetensors.torch import save_file

    layers = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            layers[name] = module
        elif "_spiel_unmerge" in module.__dict__:  # an NF4 layer merged by spiel.nn.merge: its deltas
            layers[name] = module.__dict__["_spiel_unmerge"]
    if not layers:
        raise ValueError("save_deltas: the model has no SparseDeltaLinear layers (call spiel.nn.inject first)")
    tensors: Dict[str, torch.Tensor] = {}
    modules = {}
    for name, layer in layers.items():
        tensors[f"{name}.indices"] = layer.indices.detach().cpu().contiguous().clone()
        tensors[f"{name}.values"] = layer.values.detach().cpu().contiguous().clone()
        modules[name] = {"shape": [layer.out_features, layer.in_features], "num_deltas": layer.num_deltas,
                         "values_dtype": _dtype_name(layer.values.dtype), "quantized": layer.is_quantized}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "spiel_version": __version__, "modules": modules}
    save_file(tensors, os.fspath(path), metadata={"spiel": json.dumps(config)})


def read_deltas(path: PathLike):
    """Read a deltas file: returns ``(config dict, {key: tensor})``; raises ValueError if it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no deltas file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None
    try:
        config = json.loads(meta["spiel"])
        if config.get("format") != FORMAT:
            raise KeyError("format")
        modules = config["modules"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path!r} is not a spiel deltas file (no 'spiel' config in its metadata)") from None
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path!r} has deltas format version {config['format_version']}; this spiel "
                         f"({__version__}) reads up to {FORMAT_VERSION}")
    for name, info in modules.items():
        for part in ("indices", "values"):
            key = f"{name}.{part}"
            if key not in tensors:
                raise ValueError(f"{path!r}: module {name!r} has no tensor {key!r}")
            if tensors[key].dim() != 1 or tensors[key].numel() != int(info["num_deltas"]):
                raise ValueError(f"{path!r}: module {name!r}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected [{info['num_deltas']}]")
    return config, tensors


def load_deltas(model: nn.Module, path: PathLike, *, strict: bool = True,
                freeze: bool = True) -> "OrderedDict[str, SparseDeltaLinear]":
    """Load deltas saved by :func:`save_deltas` into ``model`` (in place); returns name -> layer.

    For each module listed in the file: if it is already a :class:`SparseDeltaLinear` its indices and values
    are replaced (resizing it if the count differs); if it is still a plain ``nn.Linear`` / bitsandbytes
    ``Linear4bit`` it is injected automatically with the saved count and values dtype (like
    :func:`spiel.nn.inject`; with ``freeze=True`` every other parameter of the model is then frozen) before the
    deltas are set. Only indices and values are written: the weights are untouched.

    Everything is checked before anything changes; a ValueError names the module when the file lists a module
    the model lacks, the shapes differ, or the file is not a (valid) deltas file. With ``strict=True``
    (default), an injected layer of the model that the file does not list is an error too.
    """
    config, tensors = read_deltas(path)
    modules = dict(model.named_modules())
    plan = OrderedDict()
    to_inject: Dict[str, int] = {}
    for name, info in config["modules"].items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"load_deltas: module {name!r} of {os.fspath(path)!r} is not in the model")
        if "_spiel_unmerge" in module.__dict__ or (isinstance(module, SparseDeltaLinear) and module.merged
                                                   and not module.train_merged):  # merged for training: fine
            raise ValueError(f"load_deltas: module {name!r} is merged; call spiel.nn.unmerge(model) first")
        if not isinstance(module, SparseDeltaLinear) and not _is_linear_like(module):
            raise ValueError(f"load_deltas: module {name!r} is a {type(module).__name__}, not a linear layer")
        shape = tuple(int(s) for s in info["shape"])
        if _shape(module) != shape:
            raise ValueError(f"load_deltas: module {name!r} has shape {_shape(module)} in the model but "
                             f"{shape} in {os.fspath(path)!r}")
        idx, val = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        try:
            check_index_values(idx, shape[0] * shape[1], what=f"{name}.indices")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"load_deltas: module {name!r}: {exc}") from None
        if not val.is_floating_point():
            raise ValueError(f"load_deltas: module {name!r}: values must be floating point, got {val.dtype}")
        if not isinstance(module, SparseDeltaLinear):
            to_inject[name] = idx.numel()
        plan[name] = (idx, val, info)
    if strict:
        extra = [n for n in sparse_delta_modules(model) if n not in plan]
        if extra:
            raise ValueError(f"load_deltas: the model's injected module(s) {extra} are not in {os.fspath(path)!r} "
                             "(pass strict=False to leave them as they are)")
    if to_inject:
        dtypes = {n: _DTYPES.get(plan[n][2].get("values_dtype"), torch.float32) for n in to_inject}
        _wrap_modules(model, to_inject, dtypes, None, freeze)
        modules = dict(model.named_modules())
    out: "OrderedDict[str, SparseDeltaLinear]" = OrderedDict()
    for name, (idx, val, _) in plan.items():
        layer = modules[name]
        layer.set_indices(idx, val)
        out[name] = layer
    return out
