"""CUDA kernels from the compiled extension ``spiel._C`` (backend "cuda")."""
AVAILABLE = False
REASON = "spiel._C is not built"
try:
    import spiel._C  # noqa: F401
except Exception as exc:  # the extension is optional
    REASON = f"spiel._C could not be imported ({exc}); build with `pip install --no-build-isolation -e .`"
else:
    AVAILABLE = True
