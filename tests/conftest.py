"""Shared fixtures: a tokenizer trained in-process and tiny models saved as normal HF folders."""

from __future__ import annotations

import os

# Tests never download: huggingface_hub reads this once, at import, so it is set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import logging
from pathlib import Path

import pytest

from nlm.models.scratch import build_causal_lm, build_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, distillation makes small models strong",
    "question: what is two plus two? answer: four",
    "a teacher and a student share one tokenizer",
] * 20


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SM_"):
            monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("NLM_"):
            monkeypatch.delenv(name, raising=False)
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_nlm", False):
            root.removeHandler(handler)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """A 4-layer teacher and a 2-layer student (llama configs) saved with the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, layers, hidden in (("teacher", 4, 64), ("student", 2, 32)):
        model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers, seed=1)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


@pytest.fixture(scope="session")
def other_teacher(tmp_path_factory):
    """A teacher with its own (larger, differently merged) tokenizer: cross-tokenizer distillation."""
    folder = tmp_path_factory.mktemp("other_teacher")
    tokenizer = build_tokenizer(CORPUS + ["naïve café 🙂"] * 5, vocab_size=380)
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=48, num_layers=2, seed=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def pc_file(tmp_path):
    rows = [{"prompt": f"question: what is {i} plus {i}?", "completion": f"answer: {2 * i}"} for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows)
