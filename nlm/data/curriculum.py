"""Difficulty of each training example, and its ranking from easy to hard, for curriculum learning.

`length` counts target tokens (the tokens the student is trained on); a FIELD reads a number from the
record's JSON line (found again by its stable (file, line) key). `teacher_loss` and `student_loss` need a
model: `nlm.distill.scoring` computes them in one pass and hands the scores in here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nlm.data.tokenize import IGNORE_INDEX
from nlm.errors import ConfigError

MODEL_SCORES = ("teacher_loss", "student_loss")


def target_lengths(dataset: object) -> np.ndarray:
    """Target-token count of every example: [N]."""
    labels = dataset["labels"]  # type: ignore[index]
    return np.array([sum(1 for label in row if label != IGNORE_INDEX) for row in labels], dtype=np.float64)


def field_values(paths: Sequence[Path], keys: Sequence[tuple[int, int]], name: str) -> np.ndarray:
    """The numeric field `name` of the records at (file index, line) `keys`: [N]. A missing or non-numeric
    value is a ConfigError naming the field, the file and the line."""
    wanted: dict[int, dict[int, int]] = {}
    for position, (file_index, line) in enumerate(keys):
        wanted.setdefault(int(file_index), {})[int(line)] = position
    values = np.empty(len(keys), dtype=np.float64)
    for file_index, lines in wanted.items():
        path = Path(paths[file_index])
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                position = lines.get(number)
                if position is None:
                    continue
                value = json.loads(raw.decode("utf-8-sig") if number == 1 else raw).get(name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    found = "no such field" if value is None else f"{value!r}"
                    raise ConfigError(
                        f"curriculum.by = {name!r}: {path} line {number} has {found}; expected a number in every record "
                        f"(or by: length, teacher_loss, student_loss)"
                    )
                values[position] = float(value)
    return values


def difficulty_ranking(scores: np.ndarray, order: str) -> np.ndarray:
    """Example indices from the first to be sampled to the last: low scores first for easy_first.
    Ties keep file order (a stable sort), so the ranking is deterministic."""
    scores = np.asarray(scores, dtype=np.float64)
    if order == "easy_first":
        return np.argsort(scores, kind="stable")
    if order == "hard_first":
        return np.argsort(-scores, kind="stable")
    raise ConfigError(f"curriculum.order = {order!r}: expected easy_first or hard_first")
