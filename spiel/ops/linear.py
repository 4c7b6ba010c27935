"""The sparse-delta linear layer as a thin autograd function over spiel's ops.

Forward: ``y = x @ (W + scatter(indices, values))^T + bias`` with the merged weight built by
``merge_delta`` (or the fused NF4 dequantize + delta) and freed right after the GEMM. Backward rebuilds it
for ``grad_input`` and takes the delta gradient with ``sddmm`` at the active indices (and candidate
indices, in the same launch) -- no out x in tensor lives between forward and backward.

``weight_merged=True``: the caller keeps ``W + delta`` in the weight's own storage (a dense weight merged in
place, see ``SparseDeltaLinear.merge_(train=True)``), so both GEMMs use it as is and only the delta gradient
is computed: no merge at all in the step.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..quant.nf4 import NF4Weight
from ._validate import WEIGHT_DTYPES, check_indices, check_same_device, check_tensor
from .merge import merge_delta_eager
from .nf4 import nf4_dequantize_add_delta_eager
from .backends.sddmm_plan import is_row_plan
from .sddmm import sddmm_eager

WeightLike = Union[torch.Tensor, NF4Weight]
_DTYPES = WEIGHT_DTYPES + (torch.float64,)  # float64 runs on the reference backend (gradcheck)


def effective_weight(weight: WeightLike, indices: torch.Tensor, values: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """``W + scatter(indices, values)`` in ``dtype`` (one fused op for NF4 weights)."""
    eager = not torch.compiler.is_compiling()  # eager: the ops' implementations directly (no dispatch)
    if isinstance(weight, NF4Weight):
        fn = nf4_dequantize_add_delta_eager if eager else torch.ops.spiel.nf4_dequantize_add_delta
        return fn(*weight.op_args(), dtype, indices, values)
    merged = (merge_delta_eager if eager else torch.ops.spiel.merge_delta)(weight, indices, values)
    return merged if merged.dtype == dtype else merged.to(dtype)


def _sddmm(go, x, indices, out_features, in_features, plan):
    fn = torch.ops.spiel.sddmm if torch.compiler.is_compiling() else sddmm_eager
    return fn(go, x, indices, out_features, in_features, plan)


def _compute_weight(weight, indices, values, dtype, weight_merged):
    if weight_merged:  # W + delta already in the weight's storage
        return weight if weight.dtype == dtype else weight.to(dtype)
    return effective_weight(weight, indices, values, dtype)


class _SparseDeltaLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, indices, values, bias, candidates, candidate_values, plan, probe, fp8_weight_grad,
                weight_merged):
        merged = _compute_weight(weight, indices, values, input.dtype, weight_merged)
        output = F.linear(input, merged, None if bias is None else bias.to(input.dtype))
        del merged  # freed here: backward rebuilds it
        ctx.weight = weight  # a reference to the frozen weight, no copy
        ctx.weight_merged = weight_merged
        ctx.probe = probe
        ctx.fp8_weight_grad = fp8_weight_grad
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.has_candidates = candidates is not None
        ctx.values_dtype = values.dtype
        # merged: backward never reads the values (the weight holds W + delta), so they are not saved -- under
        # gradient checkpointing each saved tensor costs a pack and an unpack hook per layer and step. For the
        # same reason the indices and the plan (the layer's buffers, only ever replaced between steps) are kept
        # as plain references in eager mode, with autograd's in-place check done by hand on their versions.
        ctx.by_reference = not torch.compiler.is_compiling()
        if ctx.by_reference:
            ctx.indices, ctx.plan = indices, plan
            ctx.versions = (indices._version, None if plan is None else plan._version)
            ctx.save_for_backward(input, None if weight_merged else values, candidates)
        else:
            ctx.save_for_backward(input, None if weight_merged else values, candidates, indices, plan)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.by_reference:
            input, values, candidates = ctx.saved_tensors
            indices, plan = ctx.indices, ctx.plan
            if (indices._version, None if plan is None else plan._version) != ctx.versions:
                raise RuntimeError("sparse_delta_linear: the indices (or their sddmm plan) were modified in place "
                                   "between forward and backward; replace them between steps instead")
        else:
            input, values, candidates, indices, plan = ctx.saved_tensors
        weight = ctx.weight
        out_features = grad_output.shape[-1]
        in_features = input.shape[-1]
        go = grad_output.reshape(-1, out_features)
        if not go.is_contiguous():
            go = go.contiguous()
        x = input.reshape(-1, in_features)
        if not x.is_contiguous():
            x = x.contiguous()
        need_input, _, _, need_values, need_bias, _, need_candidates = ctx.needs_input_grad[:7]
        grad_input = grad_values = grad_bias = grad_candidates = None
        fp8 = ctx.fp8_weight_grad and go.dtype != torch.float64
        # a probe that forms the dense gradient anyway (SpIEL-AG's candidate probe) can hand back the values'
        # gradient from it: the sddmm below (a second dense GEMM at LoRA-like densities) is then skipped
        probed, from_probe = False, None
        if (ctx.probe is not None and need_values and not ctx.has_candidates and not fp8
                and getattr(ctx.probe, "gathers_delta_gradient", False)):
            from_probe = ctx.probe(go, x, indices)
            probed = True
        if need_input:
            merged = _compute_weight(weight, indices, values, go.dtype, ctx.weight_merged)
            grad_input = (go @ merged).view(input.shape)
            del merged
        if from_probe is not None:
            grad_values = from_probe.to(ctx.values_dtype)
        elif need_values or need_candidates:
            if ctx.has_candidates and need_candidates:
                k = indices.shape[0]
                both = torch.cat([indices, candidates.to(indices.dtype)])
                # a row plan describes the sorted indices alone, not cat(indices, candidates)
                plan_both = None if is_row_plan(plan, out_features) else plan
                grads = (torch.ops.spiel.sddmm_fp8(go, x, both, out_features, in_features) if fp8 else
                         _sddmm(go, x, both, out_features, in_features, plan_both))
                grad_values = grads[:k].to(ctx.values_dtype) if need_values else None
                grad_candidates = grads[k:]
            elif fp8:
                grad_values = torch.ops.spiel.sddmm_fp8(go, x, indices, out_features, in_features).to(ctx.values_dtype)
            else:
                grads = _sddmm(go, x, indices, out_features, in_features, None if ctx.has_candidates else plan)
                grad_values = grads.to(ctx.values_dtype)
        if need_bias:
            grad_bias = go.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if ctx.probe is not None and not probed:
            ctx.probe(go, x)
        return grad_input, None, None, grad_values, grad_bias, None, grad_candidates, None, None, None, None


def sparse_delta_linear(input: torch.Tensor, weight: WeightLike, indices: torch.Tensor, values: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, *, candidates: Optional[torch.Tensor] = None,
                        candidate_values: Optional[torch.Tensor] = None, plan: Optional[torch.Tensor] = None,
                        probe: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
                        validate: Optional[bool] = None, fp8_weight_grad: bool = False,
                        weight_merged: bool = False) -> torch.Tensor:
    """``input @ (W + scatter(indices, values))^T + bias`` with autograd for input, values and bias.

    Args:
        input: [..., in] bf16/fp16/fp32 (the compute dtype; under autocast, the autocast dtype).
        weight: frozen [out, in] tensor or :class:`spiel.quant.NF4Weight` (never receives a gradient).
        indices: [k] int32/int64 sorted unique flat positions; values: [k] deltas (gradient in its dtype).
        bias: optional [out].
        candidates / candidate_values: optional [c] sorted positions disjoint from ``indices`` and an fp32
            [c] leaf requiring grad: its ``.grad`` receives the delta gradient at the candidates (SpIEL-AG),
            computed in the same ``sddmm`` launch as the values' gradient.
        plan: optional ``sddmm_plan`` of ``indices`` (or of ``cat(indices, candidates)`` when candidates
            are given), or a row plan of ``indices`` (``sddmm_plan.build_row_plan``; ignored for candidates).
        probe: optional callable ``probe(grad_output_2d, input_2d)`` run once in backward (candidate
            selection). A probe whose attribute ``gathers_delta_gradient`` is true is called as
            ``probe(grad_output_2d, input_2d, indices)`` instead (when the values need a gradient, without
            candidates or fp8) and may return the fp32 [k] delta gradient at ``indices`` read from the dense
            gradient it forms: the backward then uses it and skips its own ``sddmm``; None falls back to it.
        validate: check index values (a host sync); default: ``spiel.ops.set_validation``'s setting.
        fp8_weight_grad: take the delta gradient (values and candidates) from e4m3 operands with per-row /
            per-column scales (:func:`spiel.ops.sddmm_fp8`: Hopper fp8 tensor cores, ~0.13 relative error
            bound per entry); off by default.
        weight_merged: ``weight`` (dense only) already holds ``W + scatter(indices, values)``: the GEMMs use it
            as is (no merge in forward or backward); ``values`` still receives the delta gradient.

    Saved for backward: input, values (not with ``weight_merged``) and candidates; references to the frozen
    weight, the indices and the plan (in-place changes to indices or plan before backward raise). The merged
    weight is rebuilt in backward, never kept.
    """
    check_tensor("input", input, dtypes=_DTYPES)
    if isinstance(weight, NF4Weight):
        out_features, in_features = weight.shape
        device = weight.device
    elif isinstance(weight, torch.Tensor):
        check_tensor("weight", weight, dtypes=_DTYPES, ndim=2)
        out_features, in_features = weight.shape
        device = weight.device
    else:
        raise TypeError(f"weight must be a torch.Tensor or spiel.quant.NF4Weight, got {type(weight).__name__}")
    if weight_merged and not isinstance(weight, torch.Tensor):
        raise TypeError("weight_merged=True needs a dense weight tensor (an NF4 weight cannot hold W + delta)")
    if input.shape[-1] != in_features:
        raise ValueError(f"input must have last dimension {in_features} (in_features), got {tuple(input.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=_DTYPES, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have {out_features} elements, got {bias.shape[0]}")
    check_same_device(input=input, indices=indices, values=values, bias=bias, candidates=candidates)
    if input.device != device:
        raise ValueError(f"input is on {input.device} but weight is on {device}")
    check_indices(indices, values, out_features * in_features, reference=input.dtype == torch.float64,
                  validate=validate)
    if candidates is not None:
        if candidate_values is None or candidate_values.shape != candidates.shape:
            raise ValueError("candidate_values must be given with candidates, of the same length")
        check_indices(candidates, None, out_features * in_features, name="candidates", validate=validate)
    return apply_sparse_delta_linear(input, weight, indices, values, bias, candidates, candidate_values, plan, probe,
                                     bool(fp8_weight_grad), bool(weight_merged))


def apply_sparse_delta_linear(input: torch.Tensor, weight: WeightLike, indices: torch.Tensor, values: torch.Tensor,
                              bias: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
                              candidate_values: Optional[torch.Tensor] = None, plan: Optional[torch.Tensor] = None,
                              probe=None, fp8_weight_grad: bool = False, weight_merged: bool = False) -> torch.Tensor:
    """:func:`sparse_delta_linear` without its argument checks, for callers that hold the layer contract
    (``spiel.nn.SparseDeltaLinear``: shapes, dtypes and devices fixed at construction, indices validated at
    each index update). Under autocast the input is cast to the autocast dtype and the op runs with autocast
    off; otherwise no context is entered (a few microseconds of Python per call matter: the 7B step is
    launch-bound)."""
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        if input.is_floating_point():
            input = input.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _SparseDeltaLinearFn.apply(input, weight, indices, values, bias, candidates, candidate_values,
                                              plan, probe, fp8_weight_grad, weight_merged)
    return _SparseDeltaLinearFn.apply(input, weight, indices, values, bias, candidates, candidate_values, plan,
                                      probe, fp8_weight_grad, weight_merged)
