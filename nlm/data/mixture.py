"""Training sources: `train_mixture` (several weighted sources) or `train_file` (one), tokenised per source.

Each source is tokenised and cached on its own, so changing a weight reuses every tokenised source. Each
example keeps a stable key, (source name, file, line), in the columns `source` (the source's index),
`source_name`, `file` and `line`; multi-teacher routing and `nlm data mix` read them.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from nlm.config.settings import TrainingConfig
from nlm.data.files import _channel_files, files_fingerprint, resolve_train_files
from nlm.data.tokenize import TokenizedData, TokenizeSettings, tokenize_records
from nlm.errors import ConfigError


@dataclass
class Source:
    """One tokenised source: its examples (with key columns), files, weight and what tokenisation found."""

    name: str
    weight: float
    files: list[Path]
    data: TokenizedData
    dataset: datasets.Dataset = field(repr=False)  # the training part (after any eval hold-out)
    eval: datasets.Dataset | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "files": files_fingerprint(self.files),
                "examples": len(self.dataset), "read": self.data.stats.read}


def source_files(index: int, path: str | None, name: str | None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Files of one mixture source: a file, a folder of *.jsonl, a glob, or $SM_CHANNEL_<NAME>."""
    environ = os.environ if environ is None else environ
    where = f"train_mixture[{index}].path"
    if path is None:
        variable = f"SM_CHANNEL_{(name or '').upper()}"
        if not environ.get(variable):
            raise ConfigError(f"{where} is not set and ${variable} is empty: give the source's path")
        return _channel_files(variable, environ[variable])
    if any(char in path for char in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"{where} = {path!r}: the pattern matches no file")
        return files
    candidate = Path(path)
    if candidate.is_dir():
        files = sorted(candidate.glob("*.jsonl"))
        if not files:
            raise ConfigError(f"{where} = {path!r}: the folder holds no *.jsonl file")
        return files
    if not candidate.exists():
        raise ConfigError(f"{where} = {path!r}: no such file")
    return [candidate]


def source_specs(config: TrainingConfig) -> list[tuple[str, float, list[Path]]]:
    """(name, weight, files) of each training source; `train_file` (or $SM_CHANNEL_TRAIN) is one source 'train'."""
    if not config.train_mixture:
        return [("train", 1.0, resolve_train_files(config.train_file))]
    return [(source.label, source.weight, source_files(i, source.path, source.name))
            for i, source in enumerate(config.train_mixture)]


def _with_keys(dataset: datasets.Dataset, index: int, name: str) -> datasets.Dataset:
    dataset = dataset.add_column("source", [index] * len(dataset))
    return dataset.add_column("source_name", [name] * len(dataset))


def load_sources(config: TrainingConfig, tokenizer: Any, settings: TokenizeSettings, cache_root: Path | None,
                 eval_split: float = 0.0, with_index: bool = False, teacher_tokenizer: Any = None) -> list[Source]:
    """Tokenise every source (each cached apart); hold out `eval_split` of each source for evaluation.
    `with_index` adds each example's position in its tokenised files (the teacher cache's key)."""
    sources = []
    for index, (name, weight, files) in enumerate(source_specs(config)):
        data = tokenize_records(files, tokenizer, settings, cache_root, teacher_tokenizer=teacher_tokenizer)
        train, held = _with_keys(data.dataset, index, name), None
        if with_index:
            train = train.add_column("index", list(range(len(train))))
        if eval_split > 0 and len(train) >= 2:
            split = train.train_test_split(test_size=eval_split, seed=config.seed, shuffle=True)
            train, held = split["train"], split["test"]
        sources.append(Source(name=name, weight=weight, files=list(files), data=data, dataset=train, eval=held))
    return sources


def concatenate(parts: Sequence[datasets.Dataset]) -> datasets.Dataset:
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(list(parts))


def record_reader(files: Sequence[Path]) -> Any:
    """A function (file index, line) -> the record's JSON object, read verbatim from its file (offsets are
    indexed once per file, so any number of look-ups costs one pass plus a seek each)."""
    offsets: dict[int, list[int]] = {}
    handles: dict[int, Any] = {}

    def read(file_index: int, line: int) -> dict[str, Any]:
        if file_index not in offsets:
            table, position = [0], 0
            with open(files[file_index], "rb") as handle:
                for raw in handle:
                    position += len(raw)
                    table.append(position)
            offsets[file_index] = table
            handles[file_index] = open(files[file_index], "rb")  # noqa: SIM115 (kept open for seeks)
        handle = handles[file_index]
        handle.seek(offsets[file_index][line - 1])
        raw = handle.readline()
        return json.loads(raw.decode("utf-8-sig") if line == 1 else raw)

    read.close = lambda: [h.close() for h in handles.values()]  # type: ignore[attr-defined]
    return read
