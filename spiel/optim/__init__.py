"""Optimizers over the sparse deltas of :class:`spiel.nn.SparseDeltaLinear` layers.

- :class:`SparseAdamW`: AdamW with per-slot step counts (bias correction restarts for regrown indices),
  fp32 (or bf16) state, decoupled weight decay toward the pretrained weight. Used with SpIEL-AG.
- :class:`SM3`: SM3 with per-row / per-column accumulators (O(out + in + k) memory per layer); its
  accumulators drive SpIEL-MA's regrowth.

Both take the model (or an iterable of layers) as first argument, optimise every layer's ``values``
(param group 0, ``group["sparse"] is True``) plus optional dense ``other_params`` (plain AdamW), and expose
``reindex(layer, order, regrown, seed=None)``, which :class:`spiel.scheduler.SpielScheduler` calls after it
changes a layer's indices. Both update the layers in groups of at most ``spiel.optim.adamw.GROUP_NUMEL`` deltas
(or their ``group_numel`` argument), which bounds the step's temporaries.
"""
from .adamw import SparseAdamW, SparseOptimizerBase, adamw_foreach, is_sparse_layer, layer_shape, sparse_layers
from .sm3 import SM3

__all__ = ["SparseAdamW", "SM3", "SparseOptimizerBase", "adamw_foreach", "sparse_layers", "is_sparse_layer",
           "layer_shape"]
