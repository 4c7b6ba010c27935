"""Data for ``python -m spiel.finetune``.

Two kinds of data:

- **classification**: ``(text, label)`` pairs. The embedded default builds one at run time from real text
  that every Python install has: the docstrings of the standard library's public functions, classes and
  methods, labelled by the top-level module that defines them (:func:`stdlib_docstrings`). A ``--data``
  jsonl of ``{"text": ..., "label": ...}`` lines is the same task on your data.
- **causal LM**: a ``--data`` jsonl of ``{"prompt": ..., "response": ...}`` lines; the loss is on the
  response tokens only.

Splits are deterministic: an example goes to the held-out set when ``sha1(key)`` falls in the held-out
fraction (hashlib, not Python's salted ``hash``), so a split never depends on the seed or the process.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# label -> the modules whose members carry it. Only explicit modules are imported: walking packages would
# import things like ``test.__main__`` or ``idlelib`` that run code on import. The pure-Python twins of C
# modules (``_pyio``) and ``os.path``'s implementation module count as their public module.
STDLIB_MODULES: Dict[str, Tuple[str, ...]] = {
    "asyncio": ("asyncio.events", "asyncio.base_events", "asyncio.streams", "asyncio.tasks", "asyncio.locks",
                "asyncio.queues", "asyncio.futures", "asyncio.transports", "asyncio.protocols",
                "asyncio.subprocess", "asyncio.runners", "asyncio.unix_events", "asyncio.selector_events"),
    "logging": ("logging", "logging.handlers", "logging.config"),
    "email": ("email", "email.message", "email.utils", "email.header", "email.parser", "email.generator",
              "email.policy", "email.headerregistry", "email.contentmanager", "email.charset",
              "email.feedparser", "email._policybase", "email.errors", "email.iterators"),
    "xml": ("xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xml.sax.saxutils",
            "xml.sax.xmlreader", "xml.dom.pulldom", "xml.dom.expatbuilder", "xml.dom.xmlbuilder"),
    "unittest": ("unittest.case", "unittest.mock", "unittest.suite", "unittest.loader", "unittest.result",
                 "unittest.runner", "unittest.main", "unittest.async_case"),
    "http": ("http", "http.client", "http.server", "http.cookies", "http.cookiejar"),
    "multiprocessing": ("multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
                        "multiprocessing.connection", "multiprocessing.process", "multiprocessing.queues",
                        "multiprocessing.synchronize", "multiprocessing.shared_memory",
                        "multiprocessing.context", "multiprocessing.reduction", "multiprocessing.util"),
    "importlib": ("importlib", "importlib.abc", "importlib.machinery", "importlib.util",
                  "importlib.resources", "importlib.resources.abc", "importlib.metadata"),
    "inspect": ("inspect",),
    "urllib": ("urllib.request", "urllib.parse", "urllib.error", "urllib.robotparser", "urllib.response"),
    "ast": ("ast",),
    "collections": ("collections", "collections.abc", "_collections_abc"),
    "io": ("io", "_pyio"),
    "pathlib": ("pathlib",),
    "os": ("os", "posixpath", "genericpath"),
    "threading": ("threading",),
    "tarfile": ("tarfile",),
    "mailbox": ("mailbox",),
    "imaplib": ("imaplib",),
    "math": ("math",),
}
MIN_DOC_CHARS = 40


@dataclass
class ClassificationData:
    train: List[Tuple[str, int]]
    test: List[Tuple[str, int]]
    labels: List[str]
    source: str = ""
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass
class CausalLMData:
    train: List[Tuple[str, str]]
    test: List[Tuple[str, str]]
    source: str = ""


def stable_hash(key: str, salt: str = "") -> int:
    """A process-independent 64-bit hash (sha1), for splits and orderings."""
    return int.from_bytes(hashlib.sha1((salt + key).encode("utf-8")).digest()[:8], "big")


def is_held_out(key: str, test_fraction: float) -> bool:
    return (stable_hash(key, "split:") % 10_000) < round(test_fraction * 10_000)


def _clean(doc: str, max_words: int) -> str:
    words = doc.split()
    return " ".join(words[:max_words])


def _module_members(modname: str) -> Dict[str, str]:
    """Qualified name -> docstring of ``modname``'s public functions and classes (defined there) and of
    those classes' public methods / properties."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(modname)
        except Exception:  # a module this Python build lacks (the label then has fewer examples)
            return {}
    out: Dict[str, str] = {}
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:
            continue
        qual = f"{modname}.{name}"
        doc = obj.__doc__
        if isinstance(doc, str) and len(doc.strip()) >= MIN_DOC_CHARS:
            out[qual] = doc
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                if (inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                        or isinstance(member, (classmethod, staticmethod, property))):
                    mdoc = getattr(member, "__doc__", None)
                    if isinstance(mdoc, str) and len(mdoc.strip()) >= MIN_DOC_CHARS:
                        out[f"{qual}.{mname}"] = mdoc
    return out


def stdlib_docstrings(max_per_class: int = 64, test_fraction: float = 0.25, max_words: int = 48,
                      modules: Optional[Dict[str, Sequence[str]]] = None) -> ClassificationData:
    """The embedded default data set: standard-library docstrings labelled by their top-level module.

    For each label of :data:`STDLIB_MODULES`: the docstrings (at least ``MIN_DOC_CHARS`` characters, first
    ``max_words`` words, whitespace collapsed) of the public functions, classes and methods defined in its
    modules. Identical texts are kept once (dropped altogether when they occur under two labels, so no
    text is both in train and held-out). At most ``max_per_class`` per label (the first by sha1 of the
    qualified name), then split by sha1 of the qualified name: ``test_fraction`` held out.
    """
    modules = STDLIB_MODULES if modules is None else modules
    labels = sorted(modules)
    by_text: Dict[str, Dict[str, str]] = {}  # text -> label -> smallest qualified name
    for label in labels:
        for modname in modules[label]:
            for qual, doc in _module_members(modname).items():
                text = _clean(doc, max_words)
                seen = by_text.setdefault(text, {})
                if label not in seen or qual < seen[label]:
                    seen[label] = qual
    per_label: Dict[str, List[Tuple[str, str]]] = {label: [] for label in labels}
    for text, owners in by_text.items():
        if len(owners) == 1:
            (label, qual), = owners.items()
            per_label[label].append((qual, text))
    train: List[Tuple[str, int]] = []
    test: List[Tuple[str, int]] = []
    counts = {}
    for y, label in enumerate(labels):
        items = sorted(per_label[label], key=lambda qt: (stable_hash(qt[0], "order:"), qt[0]))[:max_per_class]
        counts[label] = len(items)
        for qual, text in sorted(items):
            (test if is_held_out(qual, test_fraction) else train).append((text, y))
    empty = [label for label in labels if counts[label] == 0]
    if empty:
        raise RuntimeError(f"no documented members found for {empty}: is the standard library complete?")
    return ClassificationData(train=train, test=test, labels=labels,
                              source="stdlib docstrings (embedded default)",
                              info={"per_label": counts, "max_per_class": max_per_class,
                                    "test_fraction": test_fraction, "max_words": max_words})


def read_jsonl(path: str) -> List[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def jsonl_kind(rows: List[dict], path: str = "--data") -> str:
    """``"causal_lm"`` for prompt/response rows, ``"classification"`` for text/label rows."""
    keys = set(rows[0])
    if {"prompt", "response"} <= keys:
        kind, need = "causal_lm", ("prompt", "response")
    elif {"text", "label"} <= keys:
        kind, need = "classification", ("text", "label")
    else:
        raise ValueError(f"{path}: lines must be {{\"prompt\": ..., \"response\": ...}} (causal LM) or "
                         f"{{\"text\": ..., \"label\": ...}} (classification); got keys {sorted(keys)}")
    for i, row in enumerate(rows, 1):
        for k in need:
            if k not in row:
                raise ValueError(f"{path}: example {i} lacks {k!r}")
            if k != "label" and not isinstance(row[k], str):
                raise ValueError(f"{path}: example {i}: {k!r} must be a string")
    return kind


def load_jsonl_data(path: str, test_fraction: float = 0.1):
    """A ``--data`` file as :class:`ClassificationData` or :class:`CausalLMData` (split by sha1 of the line
    number and content; at least one example on each side)."""
    rows = read_jsonl(path)
    kind = jsonl_kind(rows, path)
    keys = [f"{i}:{json.dumps(r, sort_keys=True)}" for i, r in enumerate(rows)]
    held = [is_held_out(k, test_fraction) for k in keys]
    if len(rows) >= 2 and all(held):
        held[0] = False
    if len(rows) >= 2 and not any(held):
        held[-1] = True
    if kind == "causal_lm":
        pairs = [(r["prompt"], r["response"]) for r in rows]
        return CausalLMData(train=[p for p, h in zip(pairs, held) if not h] or pairs,
                            test=[p for p, h in zip(pairs, held) if h] or pairs, source=path)
    labels = sorted({str(r["label"]) for r in rows})
    if len(labels) < 2:
        raise ValueError(f"{path}: classification needs at least 2 distinct labels, got {labels}")
    index = {label: i for i, label in enumerate(labels)}
    pairs = [(r["text"], index[str(r["label"])]) for r in rows]
    return ClassificationData(train=[p for p, h in zip(pairs, held) if not h] or pairs,
                              test=[p for p, h in zip(pairs, held) if h] or pairs, labels=labels, source=path)


# ----------------------------------------------------------------------------------------------- batching
GROUP_BATCHES = 8


def batch_order(lengths: Sequence[int], batch_size: int, generator: Optional[torch.Generator] = None,
                shuffle: bool = True) -> List[List[int]]:
    """Example indices per batch for one pass. Shuffled: a random permutation cut into groups of
    ``GROUP_BATCHES`` batches, each group sorted by length before it is cut into batches, and the batches
    shuffled (as transformers' ``group_by_length``: less padding, still random batches). Not shuffled: in
    order of length (evaluation; the metrics do not depend on the order)."""
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]
    perm = torch.randperm(n, generator=generator).tolist()
    group = batch_size * GROUP_BATCHES
    out = []
    for g in range(0, n, group):
        part = sorted(perm[g:g + group], key=lambda i: -lengths[i])
        out += [part[s:s + batch_size] for s in range(0, len(part), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def classification_batches(examples: List[Tuple[str, int]], tokenizer, batch_size: int, max_length: int,
                           generator: Optional[torch.Generator] = None, shuffle: bool = True):
    """Yields ``(encoding dict, labels)``; one pass over ``examples`` (see :func:`batch_order`)."""
    for idx in batch_order([len(t) for t, _ in examples], batch_size, generator, shuffle):
        chunk = [examples[i] for i in idx]
        enc = tokenizer([t for t, _ in chunk], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        yield dict(enc), torch.tensor([y for _, y in chunk], dtype=torch.long)


def causal_lm_encode(tokenizer, prompt: str, response: str, max_length: int) -> Tuple[List[int], List[int]]:
    """Token ids of ``prompt + response (+ eos)`` and labels (-100 on the prompt)."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + p_ids + r_ids + eos
    labels = [-100] * (len(bos) + len(p_ids)) + r_ids + eos
    ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def causal_lm_batches(examples: List[Tuple[str, str]], tokenizer, batch_size: int, max_length: int,
                      generator: Optional[torch.Generator] = None, shuffle: bool = True):
    """Yields ``(encoding dict, labels)`` for a causal LM (right padding, labels -100 on prompt/padding)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    lengths = [len(p) + len(r) for p, r in examples]
    for idx in batch_order(lengths, batch_size, generator, shuffle):
        encoded = [causal_lm_encode(tokenizer, *examples[i], max_length) for i in idx]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            labels[row, :len(lab)] = torch.tensor(lab)
        yield {"input_ids": input_ids, "attention_mask": attention}, labels
