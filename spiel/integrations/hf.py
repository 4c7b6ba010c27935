"""Hugging Face ``transformers`` integration: :class:`SpielCallback` and :func:`create_spiel_optimizer`.

Usage with ``Trainer``::

    model = ...  # SparseDeltaLinear layers injected
    optimizer = create_spiel_optimizer(model, "adamw", lr=2e-4)          # "sm3" for mode="ma"
    scheduler = SpielScheduler(model, optimizer, mode="ag", total_steps=None)  # None: taken from Trainer
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None),
                      callbacks=[SpielCallback(scheduler)])
    trainer.train()
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from transformers import TrainerCallback

from ..optim import SM3, SparseAdamW, sparse_layers
from ..scheduler import SpielScheduler

__all__ = ["SpielCallback", "create_spiel_optimizer", "SCHEDULER_STATE_NAME"]

SCHEDULER_STATE_NAME = "spiel_scheduler{suffix}.pt"


def create_spiel_optimizer(model: torch.nn.Module, optimizer: str = "adamw", *, lr: float = 1e-3,
                           train_other_params: bool = True, **kwargs):
    """The optimizer for ``Trainer(optimizers=(opt, None))``.

    Args:
        model: the model with SparseDeltaLinear layers.
        optimizer: ``"adamw"`` (:class:`spiel.optim.SparseAdamW`, for SpIEL-AG) or ``"sm3"``
            (:class:`spiel.optim.SM3`, required by SpIEL-MA).
        lr: learning rate (Trainer's ``learning_rate`` is NOT applied to a user-given optimizer, but its LR
            scheduler is, on top of this value).
        train_other_params: also optimise every other parameter with ``requires_grad`` (e.g. a classifier head)
            with plain AdamW (``other_params=``).
        kwargs: forwarded to the optimizer (betas, eps, weight_decay, state_dtype / momentum, ...).
    """
    values = {id(layer.values) for _, layer in sparse_layers(model)}
    other = None
    if train_other_params:
        other = [p for p in model.parameters() if p.requires_grad and id(p) not in values] or None
    name = optimizer.lower()
    if name == "adamw":
        return SparseAdamW(model, lr=lr, other_params=other, **kwargs)
    if name == "sm3":
        return SM3(model, lr=lr, other_params=other, **kwargs)
    raise ValueError(f"optimizer must be 'adamw' or 'sm3', got {optimizer!r}")


class SpielCallback(TrainerCallback):
    """Runs a :class:`spiel.scheduler.SpielScheduler` inside ``transformers.Trainer``.

    - ``on_train_begin``: sets ``scheduler.total_steps`` from ``state.max_steps`` when it is None; when resuming
      (``state.global_step > 0``) loads the scheduler state saved with the checkpoint (see ``on_save``).
    - ``on_step_end`` (after optimizer.step, lr_scheduler.step and zero_grad): ``scheduler.step()``.
    - ``on_save``: writes ``scheduler.state_dict()`` to ``<checkpoint>/spiel_scheduler[_rank<r>].pt`` (one
      file per rank under torch.distributed: pending AG candidate gradients are per-rank until the update).

    With fp16 AMP set ``scheduler.grad_scaler = trainer.accelerator.scaler`` after building the Trainer.
    """

    def __init__(self, scheduler: SpielScheduler, save_state: bool = True):
        self.scheduler = scheduler
        self.save_state = save_state
        self.loaded_from: Optional[str] = None  # the checkpoint folder the scheduler state was restored from

    @staticmethod
    def _file_name() -> str:
        size, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return SCHEDULER_STATE_NAME.format(suffix="" if size == 1 else f"_rank{rank}")

    def load_checkpoint(self, checkpoint_dir: str) -> bool:
        """Load the scheduler state from a Trainer checkpoint folder; False when it holds none."""
        path = os.path.join(checkpoint_dir, self._file_name())
        if not os.path.isfile(path):
            return False
        self.scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        self.loaded_from = checkpoint_dir
        return True

    def on_train_begin(self, args, state, control, **kwargs):
        if self.scheduler.total_steps is None:
            self.scheduler.set_total_steps(int(state.max_steps))
        if state.global_step > 0 and self.scheduler.step_count != state.global_step:
            candidates = []
            if isinstance(getattr(args, "resume_from_checkpoint", None), str):
                candidates.append(args.resume_from_checkpoint)
            candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            for folder in candidates:
                if self.load_checkpoint(folder) and self.scheduler.step_count == state.global_step:
                    break
            else:
                warnings.warn(f"SpielCallback: no scheduler state found for step {state.global_step} (looked in "
                              f"{candidates}); continuing from that step without pending candidates")
                self.scheduler.reset(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step()

    def on_save(self, args, state, control, **kwargs):
        if not self.save_state:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.scheduler.state_dict(), os.path.join(folder, self._file_name()))
