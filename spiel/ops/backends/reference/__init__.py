"""The pure-PyTorch reference backend ("torch"): runs on any device, the truth in tests."""
from . import adamw, entries, merge, nf4, outer, replace, sddmm, sddmm_fp8, topk  # noqa: F401  (registration side effects)
