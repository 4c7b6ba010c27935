"""``python -m spiel.finetune``: fine-tune a Hugging Face model with SpIEL sparse deltas, or LoRA / full
fine-tuning for comparison, and report held-out quality (see docs/README_finetune.md).

Python use::

    from spiel.finetune import run, load_finetuned
    results = run(["--compare", "spiel-ag,lora", "--steps", "100", "--out", "runs"])  # RunResult list
    model = load_finetuned("runs/spiel-ag-seed0")    # base + spiel.load_deltas + head
"""
from .data import ClassificationData, CausalLMData, load_jsonl_data, stdlib_docstrings
from .train import METHODS, RunConfig, RunResult, load_finetuned, train_run

__all__ = ["main", "run", "METHODS", "RunConfig", "RunResult", "load_finetuned", "train_run", "stdlib_docstrings",
           "load_jsonl_data", "ClassificationData", "CausalLMData"]


def main(argv=None) -> int:
    """``python -m spiel.finetune`` with ``argv`` (a list of arguments; default ``sys.argv[1:]``); returns 0."""
    from .__main__ import main as _main
    return _main(argv)


def run(argv=None):
    """Like :func:`main` but returns the list of :class:`RunResult` (one per method and seed)."""
    from .__main__ import run as _run
    return _run(argv)
