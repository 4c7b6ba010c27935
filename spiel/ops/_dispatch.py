"""Backend selection for spiel's ops.

Every public op is a ``torch.library`` op whose CPU/CUDA implementation calls :func:`call`, which picks a
kernel from one of three backends:

- ``"torch"``: the pure-PyTorch reference (any device; the truth in tests),
- ``"triton"``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``),
- ``"cuda"``: kernels from the compiled extension ``spiel._C``.

The only global state is the chosen backend (``set_backend``/``use_backend``/``SPIEL_BACKEND``) and the
validation switch (``set_validation``/``SPIEL_VALIDATE``).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# kernel name -> backend -> function
_KERNELS: Dict[str, Dict[str, Callable]] = {}
# backend -> (available, reason when unavailable)
_STATUS: Dict[str, tuple] = {
    "torch": (True, ""),
    "triton": (False, "not loaded yet"),
    "cuda": (False, "not loaded yet"),
}

# Preference of `auto` on CUDA tensors, per kernel (set from benchmarks/NOTES.md measurements).
AUTO_ORDER: Dict[str, tuple] = {}
_DEFAULT_AUTO_ORDER = ("cuda", "triton", "torch")


class _State(threading.local):
    def __init__(self) -> None:
        self.backend = _parse_backend(os.environ.get("SPIEL_BACKEND", "auto"), "SPIEL_BACKEND")
        self.validate = os.environ.get("SPIEL_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")


def _parse_backend(name: str, what: str = "backend") -> str:
    if not isinstance(name, str) or name.strip().lower() not in _CHOICES:
        raise ValueError(f"{what} must be one of {_CHOICES}, got {name!r}")
    return name.strip().lower()


_state = _State()


def register_kernel(kernel: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as ``backend``'s implementation of ``kernel``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorator(fn: Callable) -> Callable:
        _KERNELS.setdefault(kernel, {})[backend] = fn
        return fn

    return decorator


def mark_available(backend: str) -> None:
    _STATUS[backend] = (True, "")


def mark_unavailable(backend: str, reason: str) -> None:
    _STATUS[backend] = (False, reason)


def set_backend(name: str) -> None:
    """Choose the backend for this thread: ``"auto"`` (default), ``"torch"``, ``"triton"`` or ``"cuda"``.

    Raises ``RuntimeError`` at once if the backend is unavailable (not built, not importable).
    """
    name = _parse_backend(name)
    if name != "auto":
        ok, reason = _STATUS[name]
        if not ok:
            raise RuntimeError(f"spiel backend {name!r} is unavailable: {reason}")
    _state.backend = name


def get_backend() -> str:
    return _state.backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = _state.backend
    set_backend(name)
    try:
        yield
    finally:
        _state.backend = previous


def set_validation(enabled: bool) -> None:
    """Switch the value checks on indices (sorted, unique, in range) in the public op wrappers.

    They are on by default; each costs a device-to-host sync on GPU tensors. ``SPIEL_VALIDATE=0`` switches
    them off at start-up. Shape, dtype and device checks always run (they are free).
    """
    _state.validate = bool(enabled)


def validation_enabled() -> bool:
    return _state.validate and not torch.compiler.is_compiling()


def backend_info() -> Dict[str, dict]:
    """Which backends are available, why not, and which kernels each implements."""
    info = {}
    for backend in BACKENDS:
        ok, reason = _STATUS[backend]
        info[backend] = {
            "available": ok,
            "reason": reason,
            "kernels": sorted(k for k, impls in _KERNELS.items() if backend in impls),
        }
    info["selected"] = _state.backend
    return info


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select(kernel: str, device: torch.device) -> tuple:
    """Return ``(backend, fn)`` implementing ``kernel`` for tensors on ``device``."""
    impls = _KERNELS.get(kernel)
    if not impls or "torch" not in impls:
        raise RuntimeError(f"spiel kernel {kernel!r} has no reference implementation registered")
    choice = _state.backend
    if choice == "auto":
        if device.type != "cuda":
            return "torch", impls["torch"]
        for backend in AUTO_ORDER.get(kernel, _DEFAULT_AUTO_ORDER):
            if backend in impls and _STATUS[backend][0]:
                return backend, impls[backend]
        return "torch", impls["torch"]
    ok, reason = _STATUS[choice]
    if not ok:
        raise RuntimeError(f"spiel backend {choice!r} is unavailable: {reason}")
    if choice == "cuda" and device.type != "cuda":
        raise RuntimeError(f"spiel backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if choice == "triton" and not _triton_runs_on(device):
        raise RuntimeError(
            f"spiel backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got tensors on {device}"
        )
    if choice in impls:
        return choice, impls[choice]
    return "torch", impls["torch"]


def call(kernel: str, device: torch.device, *args):
    """Run ``kernel`` on the selected backend."""
    _, fn = select(kernel, device)
    return fn(*args)


def kernel_for(kernel: str, backend: str) -> Optional[Callable]:
    """The function ``backend`` registered for ``kernel`` (None if none): for tests and benchmarks."""
    return _KERNELS.get(kernel, {}).get(backend)
