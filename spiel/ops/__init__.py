"""spiel's functional ops. Each is a ``torch.library`` op (namespace ``spiel``) with a pure-PyTorch reference,
and Triton / CUDA kernels where available, chosen by :func:`set_backend` (default ``"auto"``).

==============================  =================================================================
``merge_delta``                 W + scatter(indices, values), optionally into ``out=``
``nf4_quantize``                bf16/fp16/fp32 weight -> :class:`spiel.quant.NF4Weight` (bnb layout)
``nf4_dequantize``              NF4Weight -> dense
``nf4_dequantize_add_delta``    NF4Weight + scatter(indices, values) in one pass
``sddmm`` / ``sddmm_plan``      (grad_output^T @ input) at flat indices only, fp32
``sddmm_fp8``                   the same from e4m3 operands (opt-in, Hopper fp8 tensor cores)
``sparse_delta_linear``         the layer: autograd for input, values, bias (and candidates)
``topk_abs`` / ``topk_outer``   deterministic top-k (ties by position), outer product never formed
``select_topk_abs``             the k largest |x| as an ascending set, excluded positions last (AG probe)
``adamw_step_``                 fused AdamW over lists of tensors with per-slot (or per-tensor host) step counts (in place)
``index_put_many_``             ``dense[i].view(-1)[indices[i]] = values[i]`` for a list, one launch per 64 tensors
``index_select_many``           ``out[i] = dense[i].view(-1)[indices[i]]`` for a list (merged layers' index updates)
``drop_regrow_indices``         an index update's drop + regrow for a batch of rows: new indices and the slot order
``outer_threshold``             SpIEL-MA regrowth: the score threshold of L outer products (multisection, no host sync)
==============================  =================================================================
"""
from ._dispatch import (
    AUTO_ORDER,
    BACKENDS,
    backend_info,
    get_backend,
    set_backend,
    set_validation,
    use_backend,
    validation_enabled,
)
from .merge import merge_delta
from .nf4 import nf4_dequantize, nf4_dequantize_add_delta, nf4_quantize
from .sddmm import sddmm, sddmm_plan
from .sddmm_fp8 import sddmm_fp8
from .linear import sparse_delta_linear, effective_weight
from .topk import select_topk_abs, topk_abs, topk_outer
from .adamw import adamw_step_
from .entries import index_put_many_, index_select_many
from .replace import drop_regrow_indices
from .outer import outer_threshold
from . import backends  # noqa: F401  (registers the kernels)

__all__ = [
    "AUTO_ORDER", "BACKENDS", "backend_info", "get_backend", "set_backend", "set_validation", "use_backend",
    "validation_enabled", "merge_delta", "nf4_dequantize", "nf4_dequantize_add_delta", "nf4_quantize", "sddmm",
    "sddmm_plan", "sddmm_fp8", "sparse_delta_linear", "effective_weight", "topk_abs", "topk_outer",
    "select_topk_abs", "adamw_step_", "index_put_many_", "index_select_many", "drop_regrow_indices",
    "outer_threshold",
]
