"""Integrations of the SpIEL training loop with other libraries (imported lazily).

- ``SpielCallback``: a ``transformers.TrainerCallback`` that calls ``SpielScheduler.step()`` after every
  optimizer step and saves/restores the scheduler's state with Trainer checkpoints.
- ``create_spiel_optimizer``: the optimizer to pass to ``Trainer(optimizers=(optimizer, None))``.

``import spiel.integrations`` does not import transformers; touching ``SpielCallback`` does.
"""
from typing import Any

__all__ = ["SpielCallback", "create_spiel_optimizer", "SCHEDULER_STATE_NAME"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
