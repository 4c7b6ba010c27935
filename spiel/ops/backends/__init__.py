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

# `auto` order on CUDA tensors. The CUDA sddmm's sparse kernel is 3-4x faster than Triton's (session 2). For the
# merge and the NF4 dequantize+delta the Triton kernels are a little faster on the GPU (96% / 87% of copy against
# CUDA's 80% / 78%, session 2: ~5 us per 45M-weight layer), but a Triton launch costs ~94 us of host against
# ~10 us for the extension's, and spiel's training steps are host-bound (session 6, 7B NF4 profile: 672 NF4
# launches per step, 63 ms of host in Triton's launcher, GPU busy 267 of 341 ms): the CUDA kernels come first.
from .._dispatch import AUTO_ORDER  # noqa: E402

AUTO_ORDER.update({
    "merge_delta": ("cuda", "triton", "torch"),
    "nf4_dequantize_add_delta": ("cuda", "triton", "torch"),
    "sddmm": ("cuda", "triton", "torch"),
    "sddmm_fp8": ("triton", "torch"),
})
