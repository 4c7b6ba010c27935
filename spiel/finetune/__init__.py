"""``python -m spiel.finetune``: fine-tune a Hugging Face model with SpIEL sparse deltas, or LoRA / full
fine-tuning for comparison, and report held-out quality (see docs/README_finetune.md).

Python use::

    from spiel.finetune import main, load_finetuned
    main(["--compare", "spiel-ag,lora", "--steps", "100", "--out", "runs"])
    model = load_finetuned("runs/spiel-ag-seed0")    # base + spiel.load_deltas + head
"""
from .data import ClassificationData, CausalLMData, load_jsonl_data, stdlib_docstrings
from .train import METHODS, RunConfig, RunResult, load_finetuned, train_run

__all__ = ["main", "METHODS", "RunConfig", "RunResult", "load_finetuned", "train_run", "stdlib_docstrings",
           "load_jsonl_data", "ClassificationData", "CausalLMData"]


def main(argv=None):
    """``python -m spiel.finetune`` with ``argv`` (a list of arguments; default ``sys.argv[1:]``)."""
    from .__main__ import main as _main
    return _main(argv)
