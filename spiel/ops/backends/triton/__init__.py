"""Triton kernels (backend "triton")."""
import importlib

for _name in ("merge", "nf4", "sddmm"):
    try:
        importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as exc:  # a family without Triton kernels is simply not registered
        if exc.name != f"{__name__}.{_name}":
            raise
