"""Modules: :class:`SparseDeltaLinear` and whole-model helpers.

==========================  ====================================================================
``SparseDeltaLinear``       drop-in ``nn.Linear``: frozen weight (dense or NF4) + trainable sparse delta
``inject`` / ``restore``    swap matching linears of a model in place / put the originals back
``merge`` / ``unmerge``     fold deltas into the weights (exactly reversible for dense bases)
``merged_state_dict``       a plain state_dict with the deltas merged (export)
``save_deltas`` / ``load_deltas``   only indices + values, as safetensors
``sparse_delta_modules``    name -> SparseDeltaLinear of a model
``rebuild_sddmm_plans``     refresh many layers' sddmm plans after ``set_indices(..., rebuild_plan=False)``
``refresh_merged_entries``  rewrite the merged entries of many layers trained merged after an optimizer step
==========================  ====================================================================
"""
from .linear import SparseDeltaLinear, random_indices, rebuild_sddmm_plans, refresh_merged_entries
from .inject import inject, merge, merged_state_dict, restore, sparse_delta_modules, split_budget, unmerge
from .io import load_deltas, read_deltas, save_deltas

__all__ = [
    "SparseDeltaLinear", "random_indices", "inject", "restore", "merge", "unmerge", "merged_state_dict",
    "sparse_delta_modules", "split_budget", "save_deltas", "load_deltas", "read_deltas", "rebuild_sddmm_plans",
    "refresh_merged_entries",
]
