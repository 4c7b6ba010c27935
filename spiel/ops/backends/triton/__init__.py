"""Triton kernels (backend "triton"): importing registers them with the dispatch."""
from . import merge, nf4, sddmm  # noqa: F401
