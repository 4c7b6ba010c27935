"""Baselines shared by the benchmarks: the published SpIEL math, LoRA layers, bitsandbytes NF4 helpers.

"Published SpIEL math" is what the paper's released code does per linear layer and training step
(ANCHORS.md): forward clones W, scatter-adds the deltas and runs the GEMM; backward clones and scatters
again for the dX GEMM, computes the dense dW GEMM and gathers it at the indices; indices are int64 and the
deltas have the weight's dtype. On an NF4 base the clone is a bitsandbytes ``dequantize_4bit``.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import Skip

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------
# optional packages
# ---------------------------------------------------------------------------------------------------------
def import_optional(name: str):
    """Import ``name`` or raise :class:`Skip` naming the missing package."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise Skip(f"{name} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})")


def bnb_module():
    return import_optional("bitsandbytes")


def peft_module():
    return import_optional("peft")


def spiel_ops():
    return import_optional("spiel.ops")


# ---------------------------------------------------------------------------------------------------------
# indices and counts
# ---------------------------------------------------------------------------------------------------------
def lora_count(in_features: int, out_features: int, rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on an [out, in] weight: the matched number of deltas."""
    return rank * (in_features + out_features)


def random_indices(numel: int, k: int, device, dtype=torch.int64, generator: Optional[torch.Generator] = None
                   ) -> torch.Tensor:
    """``k`` sorted unique random flat positions in [0, numel) (memory O(k), not O(numel))."""
    k = int(min(max(k, 0), numel))
    if k == 0:
        return torch.empty(0, dtype=dtype, device=device)
    if k * 4 >= numel:
        perm = torch.randperm(numel, device=device, generator=generator)[:k]
        return perm.sort().values.to(dtype)
    picked = torch.empty(0, dtype=torch.int64, device=device)
    while picked.numel() < k:
        draw = torch.randint(numel, (int((k - picked.numel()) * 1.1) + 64,), device=device, generator=generator)
        picked = torch.unique(torch.cat([picked, draw]))
    if picked.numel() > k:
        keep = torch.randperm(picked.numel(), device=device, generator=generator)[:k]
        picked = picked[keep]
    return picked.sort().values.to(dtype)


def index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel >= 2**31 else torch.int32


# ---------------------------------------------------------------------------------------------------------
# published SpIEL math
# ---------------------------------------------------------------------------------------------------------
def _dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """A fresh dense copy of the frozen weight (clone, or bitsandbytes dequantize for Params4bit)."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight.data, quant_state)
        return w if w.dtype == dtype else w.to(dtype)
    return weight.detach().clone() if weight.dtype == dtype else weight.detach().to(dtype)


def _merged(weight, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = _dense_weight(weight, dtype)
    w.view(-1).scatter_add_(0, indices, values.to(w.dtype))
    return w


class _PublishedSpielFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, indices, values, bias):
        w = _merged(weight, indices, values, x.dtype)
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        del w
        ctx.weight = weight
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, indices, values)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, indices, values = ctx.saved_tensors
        out_f, in_f = gy.shape[-1], x.shape[-1]
        g2 = gy.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f)
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            w = _merged(ctx.weight, indices, values, gy.dtype)
            gx = (g2 @ w).view(x.shape)
            del w
        if ctx.needs_input_grad[3]:
            dw = g2.t() @ x2  # the dense weight gradient [out, in]
            gv = dw.view(-1).gather(0, indices).to(values.dtype)
            del dw
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gb = g2.sum(0)
        return gx, None, None, gv, gb


def published_spiel_linear(x, weight, indices, values, bias=None):
    """The released SpIEL code's per-layer math (int64 ``indices``, ``weight`` a tensor or bnb Params4bit)."""
    return _PublishedSpielFn.apply(x, weight, indices, values, bias)


class PublishedSpielLinear(nn.Module):
    """Module replacement for an ``nn.Linear`` or bitsandbytes ``Linear4bit`` with the published SpIEL math:
    random int64 indices (no index updates), deltas in the compute dtype."""

    def __init__(self, base: nn.Module, k: int, dtype: torch.dtype = torch.bfloat16,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.base = base  # holds the frozen weight (and its bnb quant_state); never called
        base.weight.requires_grad_(False)
        self.bias = base.bias
        device = base.weight.device
        numel = self.in_features * self.out_features
        self.register_buffer("indices", random_indices(numel, k, device, torch.int64, generator))
        self.values = nn.Parameter(torch.zeros(self.indices.numel(), dtype=dtype, device=device))

    def forward(self, x):
        return published_spiel_linear(x, self.base.weight, self.indices, self.values, self.bias)


# ---------------------------------------------------------------------------------------------------------
# LoRA layers (bench_layer)
# ---------------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``x @ W^T + (x @ A^T) @ B^T * scale`` with W frozen (a tensor, or a bnb Linear4bit as ``base``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, device, dtype=torch.bfloat16,
                 weight: Optional[torch.Tensor] = None, base: Optional[nn.Module] = None, alpha: float = 16.0):
        super().__init__()
        self.base = base
        if base is None:
            self.register_buffer("weight", weight)
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        y = self.base(x) if self.base is not None else F.linear(x, self.weight)
        return y + F.linear(F.linear(x, self.A), self.B) * self.scale


# ---------------------------------------------------------------------------------------------------------
# spiel functional layer (no dependency on spiel.nn)
# ---------------------------------------------------------------------------------------------------------
def sddmm_plan_or_none(indices: torch.Tensor, out_features: int, in_features: int):
    try:
        import spiel.ops

        return spiel.ops.sddmm_plan(indices, out_features, in_features)
    except Exception:
        return None


class SpielOpsLinear(nn.Module):
    """A minimal sparse-delta layer over ``spiel.ops.sparse_delta_linear`` (frozen weight or NF4Weight)."""

    def __init__(self, weight, k: int, values_dtype=torch.float32, generator=None, **op_kwargs):
        super().__init__()
        ops = spiel_ops()
        self.weight = weight
        out_f, in_f = weight.shape
        numel = out_f * in_f
        device = weight.device
        idx = random_indices(numel, k, device, index_dtype(numel), generator)
        self.register_buffer("indices", idx)
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=values_dtype, device=device))
        self.plan = sddmm_plan_or_none(idx, out_f, in_f)
        self.op_kwargs = op_kwargs
        self._fn = ops.sparse_delta_linear

    def forward(self, x):
        return self._fn(x, self.weight, self.indices, self.values, None, plan=self.plan, validate=False,
                        **self.op_kwargs)


def spiel_fp8_option() -> Optional[Dict[str, object]]:
    """The keyword that switches spiel's fp8 path on, if spiel exposes one (else None)."""
    try:
        import spiel.ops

        params = inspect.signature(spiel.ops.sparse_delta_linear).parameters
    except Exception:
        return None
    for name in ("fp8_weight_grad", "fp8", "use_fp8", "fp8_grad", "fp8_backward"):
        if name in params:
            return {name: True}
    if "grad_dtype" in params:
        return {"grad_dtype": torch.float8_e4m3fn}
    return None


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes NF4
# ---------------------------------------------------------------------------------------------------------
def make_linear4bit(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype=torch.bfloat16) -> nn.Module:
    """A bnb ``Linear4bit`` (NF4, blocksize 64, double quant, bf16 compute) holding ``weight`` quantized
    on ``weight``'s device; the float weight is not kept."""
    bnb = bnb_module()
    out_f, in_f = weight.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype,
                            compress_statistics=double_quant, quant_type="nf4", device="meta")
    param = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=blocksize,
                              compress_statistics=double_quant, quant_type="nf4", module=lin)
    param = param.to(weight.device)
    lin.weight = param
    if getattr(lin, "quant_state", None) is None and getattr(param, "quant_state", None) is not None:
        lin.quant_state = param.quant_state
    return lin


# ---------------------------------------------------------------------------------------------------------
# module surgery
# ---------------------------------------------------------------------------------------------------------
def target_modules(model: nn.Module, targets: Iterable[str] = LINEAR_TARGETS):
    """(parent, child name, full name, module) for every module whose last name part is in ``targets``."""
    targets = set(targets)
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            found.append((parent, child, name, module))
    return found


def replace_targets(model: nn.Module, make: Callable[[nn.Module], nn.Module],
                    targets: Iterable[str] = LINEAR_TARGETS) -> int:
    n = 0
    for parent, child, _, module in target_modules(model, targets):
        setattr(parent, child, make(module))
        n += 1
    return n


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
