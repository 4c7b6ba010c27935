"""The pure-PyTorch reference backend ("torch"): runs on any device, the truth in tests."""
from . import merge, nf4, sddmm, topk  # noqa: F401  (registration side effects)
