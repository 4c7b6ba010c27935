"""Triton kernels (backend "triton"): importing registers them with the dispatch."""
from . import adamw, merge, nf4, outer, sddmm, sddmm_fp8  # noqa: F401
