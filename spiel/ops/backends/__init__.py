"""Kernel backends. Importing this package registers every available backend with the dispatch."""
import importlib
import os

from .._dispatch import mark_available, mark_unavailable
from . import reference  # noqa: F401


def _load_triton() -> None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # triton is optional
        mark_unavailable("triton", f"triton is not importable: {exc}")
        return
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        mark_unavailable("triton", "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)")
    else:
        mark_available("triton")
    importlib.import_module(".triton", __name__)


def _load_cuda() -> None:
    module = importlib.import_module(".cuda", __name__)
    if module.AVAILABLE:
        mark_available("cuda")
    else:
        mark_unavailable("cuda", module.REASON)


_load_triton()
_load_cuda()

# `auto` order on CUDA tensors, from the H100 kernel measurements in benchmarks/NOTES.md (2026-11-23,
# session 2, `bench_forward.py --tune`, same run): the Triton merge runs at 96% of copy against the CUDA
# merge's 80%, the Triton NF4 dequantize+delta at 87% against CUDA's 78%; the CUDA sddmm's sparse kernel is
# 3-4x faster than Triton's.
from .._dispatch import AUTO_ORDER  # noqa: E402

AUTO_ORDER.update({
    "merge_delta": ("triton", "cuda", "torch"),
    "nf4_dequantize_add_delta": ("triton", "cuda", "torch"),
    "sddmm": ("cuda", "triton", "torch"),
    "sddmm_fp8": ("triton", "torch"),
})
