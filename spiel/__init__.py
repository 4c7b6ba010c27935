"""spiel: CUDA and Triton training kernels for SpIEL sparse fine-tuning of large language models.

``import spiel.ops`` for the functional ops, ``spiel.nn`` for ``SparseDeltaLinear`` and model injection,
``spiel.optim`` / ``spiel.scheduler`` for the SpIEL training loop.
"""
from .version import __version__
from . import ops, quant
from .nn.io import save_deltas, load_deltas

__all__ = ["__version__", "ops", "quant", "save_deltas", "load_deltas"]
