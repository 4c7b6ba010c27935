"""End-to-end training steps of a LLaMA-shaped model: spiel against frozen, LoRA, QLoRA and the published
SpIEL math, with the same number of trainable parameters (each module: rank * (in + out)).

    python benchmarks/bench_e2e.py                          # 7B shape on one GPU, all providers, ~3.5 min
    python benchmarks/bench_e2e.py --model 1b               # TinyLlama-like shape (smaller GPUs)
    python benchmarks/bench_e2e.py --model 70b              # 70B shape, NF4 only: spiel-nf4 vs QLoRA r16
    python benchmarks/bench_e2e.py --model tiny --device cpu --steps 3   # CPU smoke test

Random weights built from a config (no download): transformers LlamaForCausalLM, bf16, SDPA attention,
batch 1 x 2048 tokens, gradient checkpointing (non-reentrant), AdamW-class optimizers. The model is built
on the meta device and materialized module by module on the target device; NF4 models quantize each
linear right after drawing its random bf16 weight, so the bf16 model never exists (needed for 70B).
On CUDA every provider runs in a fresh process (clean peak memory, a crash costs one row).

Providers:
  frozen         no trainable weights; input embeddings require grad (the floor)
  lora           peft LoRA r on q,k,v,o,gate,up,down, peft defaults (fp32 adapters), AdamW
  lora-bf16      the same with bf16 adapters (autocast_adapter_dtype=False); not in the default list
  published      published SpIEL math as a module replacement (random int64 indices, no index updates,
                 bf16 deltas), AdamW
  spiel-ag       spiel.nn.inject + spiel.optim.SparseAdamW + SpielScheduler(mode="ag")
  spiel-ag-merged  the same, trained merged (spiel.nn.merge(model, train=True): W + delta kept in the weight,
                 no merge kernel in the step)
  spiel-ag-merged-fp8  the same with the opt-in fp8 weight gradient (SparseDeltaLinear.fp8_weight_grad: the
                 delta and candidate gradients from e4m3 operands, spiel.ops.sddmm_fp8); not in the default list
  spiel-ma       spiel.nn.inject + spiel.optim.SM3 + SpielScheduler(mode="ma")
  spiel-ma-bf16  the same with bf16 deltas (values_dtype=torch.bfloat16, as the published code keeps them;
                 SM3 adds its fp32 update with one rounding): 6 instead of 8 bytes per delta plus the grad
  frozen-nf4     bitsandbytes NF4 base (blocksize 64, double quant, bf16 compute), nothing trainable
  qlora          NF4 base + peft prepare_model_for_kbit_training + LoRA r (peft defaults), AdamW
  published-nf4  published SpIEL math on the NF4 base (bnb dequantize + scatter + GEMM, dense dW)
  spiel-nf4      NF4 base + spiel.nn.inject (AG: SparseAdamW + SpielScheduler)
  spiel-nf4-ma-bf16  NF4 base + spiel.nn.inject with bf16 deltas (MA: SM3 + SpielScheduler(mode="ma"))
Step time is averaged over a window of --steps steps (default 2 x reselection_steps = 40 for spiel, so the
window holds the index updates) after a warm-up (one full reselection cycle for spiel). On CUDA the window runs
without a sync between steps (its wall time per step is `ms/step`) and each step's own time comes from CUDA events
at the step boundaries (`--sync-steps`: every step synchronised and timed alone); each step is classified as an
update step (candidate probe / accumulation / reselection) or not, so the table reports the average with and
without update steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Skip  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import providers as P  # noqa: E402

SHAPES = {
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, seq=2048, rank=64),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, seq=2048, rank=64),
    "70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000, seq=2048,
                rank=16),
    "tiny": dict(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=512, seq=64, rank=4),
}
ALL_PROVIDERS = ["frozen", "lora", "lora-bf16", "published", "spiel-ag", "spiel-ag-merged", "spiel-ag-merged-fp8",
                 "spiel-ma", "spiel-ma-bf16", "frozen-nf4", "qlora", "published-nf4", "spiel-nf4", "spiel-nf4-ma-bf16"]
# in order of importance (a spent time budget drops the last ones)
DEFAULT_PROVIDERS = ["frozen", "published", "spiel-ag", "spiel-ag-merged", "lora", "spiel-ma", "published-nf4",
                     "spiel-nf4", "qlora", "frozen-nf4"]
NF4_PROVIDERS = {"frozen-nf4", "qlora", "published-nf4", "spiel-nf4", "spiel-nf4-ma-bf16"}
SPIEL_PROVIDERS = {"spiel-ag", "spiel-ag-merged", "spiel-ag-merged-fp8", "spiel-ma", "spiel-ma-bf16", "spiel-nf4", "spiel-nf4-ma-bf16"}
MA_PROVIDERS = {"spiel-ma", "spiel-ma-bf16", "spiel-nf4-ma-bf16"}
DEFAULT_70B = ["frozen-nf4", "qlora", "spiel-nf4"]
REFERENCE = {p: ("frozen-nf4" if p in NF4_PROVIDERS else "frozen") for p in ALL_PROVIDERS}
GIB = 2**30


# ---------------------------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------------------------
def llama_config(shape: dict):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=max(4096, shape["seq"]), tie_word_embeddings=False, use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    try:
        cfg.dtype = torch.bfloat16
    except Exception:
        pass
    return cfg


def _init_(t: torch.Tensor, name: str, generator) -> None:
    if t.dim() >= 2:
        t.normal_(0.0, 0.02, generator=generator)
    elif name.endswith("bias"):
        t.zero_()
    else:
        t.fill_(1.0)  # norm weights


def build_model(shape: dict, device: torch.device, nf4: bool, dtype=torch.bfloat16, seed: int = 0):
    """LlamaForCausalLM with random weights, materialized module by module on ``device``.

    With ``nf4`` every q,k,v,o,gate,up,down becomes a bitsandbytes Linear4bit (NF4, blocksize 64, double
    quant, bf16 compute) quantized right after its bf16 weight is drawn; embeddings, norms and lm_head stay
    bf16.
    """
    from transformers import LlamaForCausalLM

    if nf4:
        P.bnb_module()  # Skip early when bitsandbytes is missing
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = set(P.LINEAR_TARGETS)
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        parent_name = name.rpartition(".")[0]
        if type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device(device):
                new = type(module)(config=cfg)
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, new)
            continue
        if nf4 and leaf in targets and isinstance(module, nn.Linear):
            w = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
            _init_(w, "weight", gen)
            lin = P.make_linear4bit(w, blocksize=64, double_quant=True, compute_dtype=dtype)
            del w
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, lin)
            continue
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            _init_(t, pname, gen)
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                raise RuntimeError(f"buffer {name}.{bname} left on meta (unknown module {type(module).__name__})")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    model.requires_grad_(False)
    if nf4:
        model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft reads it
    model.config.use_cache = False
    return model


def enable_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def module_counts(model, rank: int):
    """Suffix -> (k per module, number of modules) for the LoRA-matched deltas."""
    counts = {}
    for _, _, name, m in P.target_modules(model):
        suffix = name.rsplit(".", 1)[-1]
        in_f = getattr(m, "in_features")
        out_f = getattr(m, "out_features")
        k = P.lora_count(in_f, out_f, rank)
        prev = counts.get(suffix)
        if prev and prev[0] != k:
            raise RuntimeError(f"modules named {suffix} have different shapes")
        counts[suffix] = (k, (prev[1] if prev else 0) + 1, in_f * out_f)
    return counts


# ---------------------------------------------------------------------------------------------------------
# spiel helpers
# ---------------------------------------------------------------------------------------------------------
def spiel_layers(model):
    try:
        from spiel.nn import SparseDeltaLinear

        layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
        if layers:
            return layers
    except Exception:
        pass
    return [m for m in model.modules()
            if isinstance(getattr(m, "indices", None), torch.Tensor) and isinstance(getattr(m, "values", None),
                                                                                     nn.Parameter)]


def inject_matched(model, rank: int, notes: list, values_dtype=torch.float32):
    """spiel.nn.inject with each module's k = rank * (in + out) (the LoRA-matched count)."""
    snn = P.import_optional("spiel.nn")
    inject = getattr(snn, "inject", None)
    if inject is None:
        raise Skip("spiel.nn has no inject")
    per_module = {name: P.lora_count(m.in_features, m.out_features, rank)
                  for _, _, name, m in P.target_modules(model)}
    try:
        inject(model, target_modules=list(P.LINEAR_TARGETS), num_deltas=per_module, values_dtype=values_dtype)
    except TypeError:  # an inject without per-module counts: one call per module name
        for suffix, (k, _, _) in module_counts(model, rank).items():
            inject(model, target_modules=[suffix], num_deltas=k, values_dtype=values_dtype)
    layers = spiel_layers(model)
    if not layers:
        raise RuntimeError("spiel.nn.inject replaced no module")
    want = sum(per_module.values())
    got = sum(m.values.numel() for m in layers)
    if got != want:
        notes.append(f"deltas {got} != LoRA-matched {want}")
    return layers


def spiel_optimizer_and_scheduler(model, mode: str, args, total_steps: int, lr: float):
    optim = P.import_optional("spiel.optim")
    sched_mod = P.import_optional("spiel.scheduler")
    fused = {"auto": None, "on": True, "off": False}[getattr(args, "sparse_adamw_fused", "auto")]
    state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[getattr(args, "sparse_adamw_state", "fp32")]
    in_backward = bool(getattr(args, "step_in_backward", False))
    per_slot = getattr(args, "sparse_adamw_steps", "slot") == "slot"
    opt = (optim.SparseAdamW(model, lr=lr, fused=fused, state_dtype=state_dtype, per_slot_steps=per_slot,
                             step_in_backward=in_backward) if mode == "ag"
           else optim.SM3(model, lr=lr, step_in_backward=in_backward))
    gamma = min(args.accumulation_steps, max(1, args.reselection_steps - 1))
    # the drop fraction decays to 0 at total_steps and no update happens at or after it: pretend the run is
    # long so every update in the window happens, at (almost) the initial drop fraction (the costliest)
    total_steps = max(1000, 10 * total_steps)
    extra = {} if getattr(args, "probe_block_elements", None) is None else {"block_elements": args.probe_block_elements}
    if getattr(args, "probe_gradient", "sddmm") == "reuse":
        extra["reuse_probe_gradient"] = True
    sched = sched_mod.SpielScheduler(model, opt, mode=mode, total_steps=total_steps,
                                     reselection_steps=args.reselection_steps, accumulation_steps=gamma, **extra)
    return opt, sched


class GcClock:
    """Seconds spent in Python's cyclic GC (all generations) inside the ``with`` block (``gc.callbacks``);
    ``freeze=True`` also moves the objects alive at entry out of the collector's reach until exit."""

    def __init__(self, freeze: bool = False) -> None:
        self.total = 0.0
        self.freeze = freeze
        self._start = None

    def __enter__(self) -> "GcClock":
        if self.freeze:
            gc.freeze()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
        if self.freeze:
            gc.unfreeze()

    def _callback(self, phase, info) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total += time.perf_counter() - self._start
            self._start = None


def layer_signature(layers):
    """Per layer: (indices tensor, its version, candidates set?, probe set?) -- host-side, no sync."""
    return [(m.indices, m.indices._version, getattr(m, "candidates", None) is not None,
             getattr(m, "gradient_probe", None) is not None) for m in layers]


def update_step(before, after) -> bool:
    """A step is an update step when it started with a probe or candidates set (AG candidate selection and
    accumulation) or changed a layer's indices (reselection, AG and MA)."""
    return any(b[2] or b[3] for b in before) or \
        any(b[0] is not a[0] or b[1] != a[1] for b, a in zip(before, after))


# ---------------------------------------------------------------------------------------------------------
# one provider
# ---------------------------------------------------------------------------------------------------------
def adamw(params, lr, device):
    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, **kw)


def setup_provider(name: str, model, shape: dict, args, device, total_steps: int, notes: list):
    """Turn the built model into provider ``name``; returns (model, optimizer, scheduler, layers)."""
    rank = args.rank or shape["rank"]
    lr = 1e-4
    if name in ("frozen", "frozen-nf4"):
        enable_checkpointing(model)
        model.enable_input_require_grads()
        return model, None, None, []
    if name in ("lora", "lora-bf16", "qlora"):
        peft = P.peft_module()
        if name == "qlora":
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_checkpointing(model)
        cfg = peft.LoraConfig(r=rank, target_modules=list(P.LINEAR_TARGETS), task_type="CAUSAL_LM")
        kw = {"autocast_adapter_dtype": False} if name == "lora-bf16" else {}
        model = peft.get_peft_model(model, cfg, **kw)
        return model, adamw(model.parameters(), lr, device), None, []
    if name in ("published", "published-nf4"):
        if name == "published-nf4":
            P.bnb_module()
        gen = torch.Generator(device=device).manual_seed(1)
        P.replace_targets(model, lambda m: P.PublishedSpielLinear(
            m, P.lora_count(m.in_features, m.out_features, rank), dtype=torch.bfloat16, generator=gen))
        enable_checkpointing(model)
        values = [m.values for m in model.modules() if isinstance(m, P.PublishedSpielLinear)]
        return model, adamw(values, lr, device), None, []
    if name in SPIEL_PROVIDERS:
        P.spiel_ops()
        values_dtype = torch.bfloat16 if name.endswith("-bf16") else torch.float32
        if getattr(args, "sddmm_row_plans", "auto") == "off":
            from spiel.ops.backends import sddmm_plan

            sddmm_plan.row_plan_applies = lambda *a, **k: False  # this provider process only
            notes.append("no sddmm row plans")
        layers = inject_matched(model, rank, notes, values_dtype)
        if name.startswith("spiel-ag-merged"):
            P.import_optional("spiel.nn").merge(model, train=True)
        if name.endswith("-fp8"):
            for layer in layers:
                layer.fp8_weight_grad = True
        mode = "ma" if name in MA_PROVIDERS else "ag"
        opt, sched = spiel_optimizer_and_scheduler(model, mode, args, total_steps, lr)
        if mode == "ag" and getattr(args, "sparse_adamw_fused", "auto") != "auto":
            notes.append(f"SparseAdamW fused {args.sparse_adamw_fused}")
        if mode == "ag" and getattr(args, "sparse_adamw_state", "fp32") != "fp32":
            notes.append(f"SparseAdamW moments {args.sparse_adamw_state}")
        if mode == "ag" and getattr(args, "sparse_adamw_steps", "slot") != "slot":
            notes.append("per-tensor step counts")
        if getattr(args, "step_in_backward", False):
            notes.append("step in backward")
        if mode == "ag" and getattr(args, "probe_gradient", "sddmm") == "reuse":
            notes.append("probe step: values' gradient from the probe's blocks")
        if getattr(args, "probe_block_elements", None) is not None and mode == "ag":
            notes.append(f"probe block {args.probe_block_elements}")
        enable_checkpointing(model)
        return model, opt, sched, layers
    raise ValueError(f"unknown provider {name}")


def train_step(model, opt, sched, ids):
    """One training step as a loop runs it (forward, backward, optimizer, scheduler, zero_grad); the loss,
    detached (no sync)."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    if opt is not None:
        opt.step()
    if sched is not None:
        sched.step()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def run_provider(name: str, args, device) -> dict:
    """Build, set up and train ``name``; returns the result dict (raises on failure)."""
    shape = dict(SHAPES[args.model])
    if args.seq:
        shape["seq"] = args.seq
    spiel = name in SPIEL_PROVIDERS
    big = args.model == "70b"  # seconds per step: one reselection cycle after a short warm-up
    steps = args.steps if args.steps else ((1 if big else 2) * args.reselection_steps if spiel else 10)
    if not spiel:
        steps = args.baseline_steps or min(steps, 5 if big else 10)
    if args.warmup is not None:
        warmup = args.warmup
    else:
        # spiel: one reselection cycle, which ends with the first index update (at step S); the warm-up steps'
        # times are kept in the result ("warmup_step_ms") and the peak covers them
        warmup = (5 if big else args.reselection_steps) if spiel else (2 if big else 3)
    notes: list = []
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(shape, device, nf4=name in NF4_PROVIDERS)
    model, opt, sched, layers = setup_provider(name, model, shape, args, device, warmup + steps, notes)
    model.train()
    build_s = time.perf_counter() - t0
    trainable = sum(m.values.numel() for m in layers) if layers else P.trainable_count(model)
    gen = torch.Generator(device=device).manual_seed(2)
    batches = [torch.randint(shape["vocab"], (args.batch, shape["seq"]), device=device, generator=gen)
               for _ in range(2)]
    harness.cleanup(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) if cuda else float("nan")

    def step(i):
        return train_step(model, opt, sched, batches[i % len(batches)])

    # The measured window runs as a training loop does: no host sync between steps (a sync per step adds a
    # bubble at every step boundary, where spiel's optimizer and scheduler run on the host: 10-16 ms per 7B
    # step in session 10's profile), timed by the wall clock over the window; each step's share comes from CUDA
    # events recorded at the step boundaries on the stream (what the GPU timeline spends between them, host
    # stalls included). --sync-steps times every step alone instead (sessions 1-9). Warm-up steps: alone.
    pipelined = cuda and not args.sync_steps
    # Python's cyclic GC: a full collection walks every tracked object (~0.4M with transformers and a 7B model
    # built: 0.1-0.3 s) and lands in whichever step allocates the object that triggers it. "freeze" (default,
    # every provider alike) moves the objects alive after setup out of its reach, as long training loops do;
    # the GC time inside the measured steps is reported either way.
    with GcClock(freeze=args.gc == "freeze") as gc_clock:
        times, flags, losses, warm_times, warm_flags, host_times, gc_times = [], [], [], [], [], [], []
        events = []
        window_t0 = None
        for i in range(warmup + steps):
            measured = i >= warmup
            before = layer_signature(layers) if layers else None
            if not (pipelined and measured) or i == warmup:
                harness.sync(device)
            if pipelined and measured:
                if window_t0 is None:
                    window_t0 = time.perf_counter()
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            gc_before = gc_clock.total
            t = time.perf_counter()
            loss = step(i)
            # host time: until step() returns (it includes any wait on a full launch queue or a sync inside the
            # step, so host ~ wall does not by itself prove a host-bound step; a large gap proves a GPU-bound one)
            host_ms = (time.perf_counter() - t) * 1e3
            if not (pipelined and measured):
                harness.sync(device)
            dt = (time.perf_counter() - t) * 1e3
            flag = update_step(before, layer_signature(layers)) if layers else False
            before = None
            if measured:
                times.append(dt)
                host_times.append(host_ms)
                gc_times.append((gc_clock.total - gc_before) * 1e3)
                flags.append(flag)
                losses.append(loss)
            else:
                warm_times.append(dt)
                warm_flags.append(flag)
        window_ms = None
        if pipelined and events:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
            harness.sync(device)
            window_ms = (time.perf_counter() - window_t0) * 1e3
            times = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:])]
        losses = [float(v) for v in losses]
    peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
    steady = [t for t, f in zip(times, flags) if not f]
    steady_host = [t for t, f in zip(host_times, flags) if not f]
    upd = [t for t, f in zip(times, flags) if f]
    if spiel and not any(flags) and layers:
        notes.append("no scheduler activity seen in the window")
    if not all(math.isfinite(v) for v in losses):
        notes.append("non-finite loss")
    q = harness._quantiles(times)
    result = {
        "provider": name, "model": args.model, "seq": shape["seq"], "batch": args.batch,
        "rank": args.rank or shape["rank"], "steps": steps, "warmup": warmup,
        # the window's wall time per step (pipelined), else the mean of the steps timed alone
        "ms_avg": window_ms / len(times) if window_ms is not None else statistics.fmean(times),
        "timing": "pipelined" if window_ms is not None else "per-step sync",
        "ms_median": q["ms"], "ms_p20": q["ms_p20"], "ms_p80": q["ms_p80"],
        "ms_steady": statistics.fmean(steady) if steady else float("nan"),
        "host_ms_steady": statistics.fmean(steady_host) if steady_host else float("nan"),
        "gc_ms_avg": statistics.fmean(gc_times) if gc_times else float("nan"), "gc_mode": args.gc,
        "ms_update": statistics.fmean(upd) if upd else float("nan"), "n_update": len(upd),
        "peak_gib": peak / GIB, "static_gib": static / GIB, "trainable": trainable, "build_s": build_s,
        "step_ms": [round(t, 3) for t in times], "update_flags": flags, "loss": losses[-1] if losses else None,
        "warmup_step_ms": [round(t, 3) for t in warm_times], "warmup_update_flags": warm_flags,
        "notes": notes,
    }
    if steady and upd:  # the steps' own times on both sides (events when pipelined)
        result["update_overhead"] = statistics.fmean(times) / result["ms_steady"] - 1
    else:
        result["update_overhead"] = 0.0 if steady else float("nan")
    del model, opt, sched, layers, batches
    harness.cleanup(device)
    return result


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.common_args(p)
    p.add_argument("--model", choices=sorted(SHAPES), default="7b")
    p.add_argument("--providers", default=None,
                   help="comma list; a provider may repeat (each run gets its row, the target checks use its last "
                        "run) (default: all but lora-bf16; 70b: frozen-nf4,qlora,spiel-nf4): "
                        + ",".join(ALL_PROVIDERS))
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps (default: 2 x reselection-steps for spiel, 10 for baselines; "
                        "70b: 1 x reselection-steps and 5)")
    p.add_argument("--baseline-steps", type=int, default=None, help="measured steps for non-spiel providers "
                                                                    "(default min(--steps, 10))")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (default: reselection-steps for spiel, through its first index update; 3 for "
                        "baselines; 70b: 5 and 2)")
    p.add_argument("--reselection-steps", type=int, default=20, help="S of the scheduler (default 20)")
    p.add_argument("--accumulation-steps", type=int, default=5, help="gamma of the scheduler (default 5)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank / matched deltas (7b,1b: 64; 70b: 16)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparse-adamw-fused", choices=("auto", "on", "off"), default="auto",
                   help="SparseAdamW's fused argument (auto: the fused op on CUDA; off: the foreach chain)")
    p.add_argument("--sparse-adamw-state", choices=("fp32", "bf16"), default="fp32",
                   help="SparseAdamW's state_dtype (its moments)")
    p.add_argument("--sparse-adamw-steps", choices=("slot", "tensor"), default="slot",
                   help="SparseAdamW's step counts: per slot (default) or one per layer (per_slot_steps=False)")
    p.add_argument("--step-in-backward", action="store_true",
                   help="spiel optimizers update each layer inside backward and free its gradient")
    p.add_argument("--probe-block-elements", type=int, default=None,
                   help="SpielScheduler block_elements (the AG probe's dense-gradient block; default 2**26)")
    p.add_argument("--sddmm-row-plans", choices=("auto", "off"), default="auto",
                   help="row plans for plan-free layers (the sm90a wgmma delta gradient without a full plan; auto: "
                        "where it runs) or none (cuBLAS bands, as before session 12): an A/B switch")
    p.add_argument("--probe-gradient", choices=("sddmm", "reuse"), default="sddmm",
                   help="AG probe step: the values' gradient from the layer's own sddmm (default) or read from the "
                        "probe's dense blocks (SpielScheduler reuse_probe_gradient=True)")
    p.add_argument("--sync-steps", action="store_true",
                   help="synchronise and time every measured step alone (as sessions 1-9 did) instead of timing "
                        "the window as a training loop runs it")
    p.add_argument("--gc", choices=("freeze", "default"), default="freeze",
                   help="Python's cyclic GC during the measured steps: freeze the objects alive after setup "
                        "(default, every provider) or leave it as it is")
    p.add_argument("--no-validate", action="store_true",
                   help="SPIEL_VALIDATE=0: no index value checks (host syncs) in spiel's public wrappers")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="one fresh process per provider (default on CUDA)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--provider-timeout", type=float, default=480.0, help="seconds per provider process")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting providers once this many seconds have passed (the table still prints)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ceilings", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass


def worker(args) -> int:
    """Child process: run one provider, write its result JSON."""
    quiet()
    device = harness.pick_device(args.device)
    res = {"provider": args.worker}
    try:
        if args.ceilings:
            res["ceilings"] = harness.device_ceilings(device)
            harness.cleanup(device)
        res.update(run_provider(args.worker, args, device))
    except Skip as exc:
        res["skip"] = str(exc)
    except Exception as exc:
        res["error"] = harness.short_error(exc, 300)
        traceback.print_exc()
    res["env"] = harness.environment(device)
    with open(args.result_json, "w") as f:
        json.dump(res, f, default=str)
    return 0


def child_argv(args, provider: str, result_json: str, ceilings: bool):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--result-json", result_json,
            "--model", args.model, "--reselection-steps", str(args.reselection_steps),
            "--accumulation-steps", str(args.accumulation_steps), "--batch", str(args.batch),
            "--sparse-adamw-fused", args.sparse_adamw_fused, "--sparse-adamw-state", args.sparse_adamw_state,
            "--sparse-adamw-steps", args.sparse_adamw_steps, "--gc", args.gc,
            "--sddmm-row-plans", args.sddmm_row_plans, "--probe-gradient", args.probe_gradient]
    if args.sync_steps:
        argv.append("--sync-steps")
    if args.step_in_backward:
        argv.append("--step-in-backward")
    for flag, val in (("--device", args.device), ("--steps", args.steps), ("--baseline-steps", args.baseline_steps),
                      ("--warmup", args.warmup), ("--rank", args.rank), ("--seq", args.seq),
                      ("--probe-block-elements", args.probe_block_elements)):
        if val is not None:
            argv += [flag, str(val)]
    if ceilings:
        argv.append("--ceilings")
    return argv


def run_isolated(args, provider: str, timeout: float, ceilings: bool) -> dict:
    fd, path = tempfile.mkstemp(prefix=f"spiel-e2e-{provider}-", suffix=".json")
    os.close(fd)
    errf = tempfile.TemporaryFile(mode="w+")
    try:
        proc = subprocess.run(child_argv(args, provider, path, ceilings), stdout=sys.stdout, stderr=errf,
                              timeout=timeout)
        res = {}
        if os.path.getsize(path) > 0:
            with open(path) as f:
                res = json.load(f)
        if not res or proc.returncode != 0:
            errf.seek(0)
            tail = [ln for ln in errf.read().strip().splitlines() if ln.strip()][-3:]
            res.setdefault("provider", provider)
            res.setdefault("error", f"exit {proc.returncode}: " + " | ".join(tail)[-300:])
        elif res.get("error"):
            errf.seek(0)
            sys.stderr.write(errf.read()[-4000:])
        return res
    except subprocess.TimeoutExpired:
        return {"provider": provider, "error": f"timed out after {timeout:.0f} s"}
    finally:
        errf.close()
        if os.path.exists(path):
            os.unlink(path)


def check_targets(by: dict) -> list:
    """The lead's acceptance checks, evaluated on this run's rows."""
    def ms(p):
        return by.get(p, {}).get("ms_avg")

    def peak(p):
        v = by.get(p, {}).get("peak_gib")
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    checks = []

    def ratio(a, b, limit, label):
        if ms(a) and ms(b):
            r = ms(a) / ms(b)
            checks.append((label, f"{r:.3f}", f"<= {limit}", "PASS" if r <= limit else "FAIL"))
        else:
            checks.append((label, "-", f"<= {limit}", "n/a"))

    def mem(a, b, limit, label):
        if peak(a) is not None and peak(b) is not None:
            d = peak(a) - peak(b)
            checks.append((label, f"{d:+.2f} GiB", f"<= +{limit} GiB", "PASS" if d <= limit else "FAIL"))
        else:
            checks.append((label, "-", f"<= +{limit} GiB", "n/a"))

    for ag in ("spiel-ag", "spiel-ag-merged"):
        if ag == "spiel-ag" or ag in by:
            ratio(ag, "published", 0.85, f"{ag} / published (step)")
            ratio(ag, "lora", 0.65, f"{ag} / lora (step)")
            mem(ag, "lora", 0.7, f"{ag} peak - lora peak")
    if "spiel-ag-merged-fp8" in by:
        ratio("spiel-ag-merged-fp8", "frozen", 1.20, "spiel-ag-merged-fp8 / frozen (step)")
    ratio("spiel-nf4", "published-nf4", 0.90, "spiel-nf4 / published-nf4 (step)")
    ratio("spiel-nf4", "qlora", 0.55, "spiel-nf4 / qlora (step)")
    mem("spiel-ma", "frozen", 1.0, "spiel-ma peak - frozen peak")
    if "spiel-ma-bf16" in by:
        mem("spiel-ma-bf16", "frozen", 1.0, "spiel-ma-bf16 peak - frozen peak")
    if "spiel-nf4-ma-bf16" in by:
        mem("spiel-nf4-ma-bf16", "frozen-nf4", 1.0, "spiel-nf4-ma-bf16 peak - frozen-nf4 peak")
    for p in ("spiel-ag", "spiel-ag-merged", "spiel-ag-merged-fp8", "spiel-ma", "spiel-ma-bf16", "spiel-nf4",
              "spiel-nf4-ma-bf16"):
        if p not in ("spiel-ag", "spiel-ma", "spiel-nf4") and p not in by:
            continue
        r = by.get(p)
        o = (r or {}).get("update_overhead")
        if r and r.get("ms_avg") and r.get("n_update") and isinstance(o, float) and math.isfinite(o):
            checks.append((f"{p} index-update overhead", f"{100 * o:.1f}%", "<= 3%", "PASS" if o <= 0.03 else "FAIL"))
        else:
            checks.append((f"{p} index-update overhead", "-", "<= 3%", "n/a"))
    return checks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_validate:
        os.environ["SPIEL_VALIDATE"] = "0"  # inherited by the provider processes
        try:
            import spiel.ops

            spiel.ops.set_validation(False)
        except Exception:
            pass
    if args.worker:
        return worker(args)
    quiet()
    start = time.perf_counter()
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    isolate = args.isolate if args.isolate is not None else device.type == "cuda"
    if args.providers:
        provs = [p.strip() for p in args.providers.split(",") if p.strip()]
    else:
        provs = DEFAULT_70B if args.model == "70b" else DEFAULT_PROVIDERS
    unknown = [p for p in provs if p not in ALL_PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {ALL_PROVIDERS}")
    shape = SHAPES[args.model]
    rank = args.rank or shape["rank"]
    print(f"== bench_e2e --model {args.model}: hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
          f"{shape['layers']} layers, {shape['heads']} heads ({shape['kv_heads']} kv), vocab {shape['vocab']}, "
          f"batch {args.batch} x {args.seq or shape['seq']} tokens, LoRA-matched rank {rank}, "
          f"S={args.reselection_steps} gamma={args.accumulation_steps}, device {dev_name}, "
          f"{'one process per provider' if isolate else 'in-process'}", flush=True)
    csv_file = harness.csv_path(args.csv)
    rid = harness.run_id()
    results = []
    ceil = {}
    env = None
    if not isolate:
        device = harness.pick_device(args.device)
        ceil = harness.device_ceilings(device)
        env = harness.environment(device)
    for prov in provs:
        elapsed = time.perf_counter() - start
        if args.model == "70b" and prov not in NF4_PROVIDERS:
            res = {"provider": prov, "skip": "70b runs on an NF4 base only"}
        elif args.budget_s is not None and args.budget_s - elapsed < 25:
            res = {"provider": prov, "skip": f"time budget ({args.budget_s:.0f} s) spent"}
        elif isolate:
            timeout = args.provider_timeout
            if args.budget_s is not None:
                timeout = min(timeout, args.budget_s - elapsed)
            res = run_isolated(args, prov, timeout, ceilings=not ceil)
            if res.get("ceilings"):
                ceil = res["ceilings"]
            if res.get("env") and not env:
                env = res["env"]
        else:
            res = {"provider": prov}
            try:
                res.update(run_provider(prov, args, device))
            except Skip as exc:
                res["skip"] = str(exc)
            except Exception as exc:
                res["error"] = harness.short_error(exc, 300)
                if os.environ.get("SPIEL_BENCH_DEBUG"):
                    traceback.print_exc()
            harness.cleanup(device)
        results.append(res)
        line = f"  {prov:<14}"
        if "ms_avg" in res:
            line += (f" {res['ms_avg']:8.1f} ms/step (steady {res['ms_steady']:.1f}, {res['n_update']} update steps)"
                     f"  peak {res['peak_gib']:.2f} GiB  trainable {res['trainable'] / 1e6:.1f}M"
                     f"  build {res['build_s']:.0f} s")
        else:
            line += " " + (f"skipped: {res['skip']}" if "skip" in res else f"failed: {res.get('error')}")
        print(line, flush=True)

    by = {r["provider"]: r for r in results if "ms_avg" in r}
    env = env or {"gpu": dev_name, "commit": harness.git_commit(), **harness.versions()}
    rows = []
    for r in results:
        p = r["provider"]
        ref = by.get(REFERENCE[p], {}).get("ms_avg")
        note = "; ".join(r.get("notes", []))
        if "skip" in r:
            note = f"skipped: {r['skip']}"
        elif "error" in r:
            note = f"failed: {r['error']}"
        row = {"run_id": rid, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "suite": "e2e",
               "case": args.model, "provider": p, "shape": args.model, "k": r.get("trainable", ""),
               "ms": r.get("ms_avg"), "ms_p20": r.get("ms_p20"), "ms_p80": r.get("ms_p80"),
               "x_ref": (r["ms_avg"] / ref) if ref and r.get("ms_avg") else None,
               "peak_mib": r["peak_gib"] * 1024 if isinstance(r.get("peak_gib"), float) else None,
               "note": note,
               "extra": {k: r.get(k) for k in ("ms_median", "ms_steady", "host_ms_steady", "gc_ms_avg", "gc_mode", "timing", "ms_update", "n_update", "update_overhead",
                                                "static_gib", "peak_gib", "trainable", "build_s", "steps", "warmup",
                                                "seq", "batch", "rank", "step_ms", "update_flags", "loss",
                                                "warmup_step_ms", "warmup_update_flags")
                         if k in r},
               **env, "copy_tbps": ceil.get("copy_tbps"), "gemm_tflops": ceil.get("gemm_tflops")}
        row["extra"]["reference"] = REFERENCE[p]
        rows.append(row)
    harness.append_rows(csv_file, rows)

    print(f"\n   device: {env.get('gpu')} | torch {env.get('torch')} triton {env.get('triton')} spiel "
          f"{env.get('spiel')} | commit {env.get('commit')}")
    if ceil:
        print(f"   measured ceilings: copy {harness.fmt(ceil.get('copy_tbps'))} TB/s, bf16 GEMM "
              f"{harness.fmt(ceil.get('gemm_tflops'))} TFLOP/s")

    result_of = {id(row): r for row, r in zip(rows, results)}  # one row per run (a provider may repeat)

    def g(key, scale=1.0):
        def get(row):
            r = result_of.get(id(row), {})
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return None
            return v if scale == 1.0 else v * scale
        return get

    harness.print_table(rows, [
        ("provider", "provider"),
        ("ms/step", "ms"),
        ("steady ms", g("ms_steady")),
        ("host ms", g("host_ms_steady")),
        ("gc ms", g("gc_ms_avg")),
        ("update ms", g("ms_update")),
        ("upd steps", g("n_update")),
        ("upd +%", g("update_overhead", 100.0)),
        ("x ref", "x_ref"),
        ("ref", lambda r: REFERENCE[r["provider"]]),
        ("peak GiB", g("peak_gib")),
        ("trainable M", g("trainable", 1e-6)),
        ("note", lambda r: harness.clip(r.get("note") or "", 60)),
    ], title=f"bench_e2e --model {args.model}: batch {args.batch} x {args.seq or shape['seq']} tokens, "
             f"gradient checkpointing, rank {rank} matched ({env.get('gpu')}; "
             f"{'steps timed alone' if args.sync_steps or device.type != 'cuda' else 'window timed as a loop runs'})")
    checks = check_targets(by)
    harness.print_table([dict(check=c[0], value=c[1], target=c[2], result=c[3]) for c in checks],
                        [("check", "check"), ("value", "value"), ("target", "target"), ("result", "result")],
                        title="targets (same run)")
    print(f"\nrows appended to {csv_file} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
