"""The SpIEL training loop's index updates: :class:`SpielScheduler` (modes ``"ag"`` and ``"ma"``).

Typical loop::

    opt = spiel.optim.SparseAdamW(model, lr=2e-4)           # mode="ma": spiel.optim.SM3(model, lr=...)
    sched = spiel.scheduler.SpielScheduler(model, opt, mode="ag", total_steps=N)
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()          # index update every reselection_steps (default 20)
        opt.zero_grad()
"""
from ._outer import batched_topk_outer
from ._select import merge_top, segmented_topk_abs, top_gradient_entries, union_top
from .spiel_scheduler import SpielScheduler, drop_fraction_at

__all__ = ["SpielScheduler", "drop_fraction_at", "top_gradient_entries", "segmented_topk_abs", "batched_topk_outer",
           "merge_top", "union_top"]
