"""Choosing records from a scored pool: the top `count` by score, optionally skipping near-duplicates.

Near-duplicates are judged by word 3-gram overlap (Jaccard similarity of the records' text): a candidate
whose overlap with an already chosen record exceeds `max_overlap` is passed over, and only taken at the end
if too few distinct records remain, so the selection always has exactly `count` records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from nlm.errors import ConfigError

MAX_OVERLAP = 0.5


def selection_size(available: int, fraction: float | None, count: int | None) -> int:
    """How many records to keep: exactly `count`, or round(fraction · pool); at least 1."""
    if (fraction is None) == (count is None):
        raise ConfigError("give exactly one of --fraction or --count")
    if count is not None:
        if count > available:
            raise ConfigError(f"--count {count}: the pool has only {available} scorable records")
        return count
    assert fraction is not None
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction {fraction}: expected a number in (0, 1]")
    return max(1, min(available, int(math.floor(fraction * available + 0.5))))


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    words = text.lower().split()
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def top_indices(scores: np.ndarray, count: int, texts: Sequence[str] | None = None,
                max_overlap: float = MAX_OVERLAP) -> list[int]:
    """Indices of the `count` highest scores (ties: earlier first); with `texts`, near-duplicates last."""
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if texts is None:
        return ranked[:count]
    chosen: list[int] = []
    chosen_sets: list[frozenset] = []
    passed_over: list[int] = []
    for i in ranked:
        if len(chosen) == count:
            break
        grams = shingles(texts[i])
        if any(len(grams & other) / max(len(grams | other), 1) > max_overlap for other in chosen_sets):
            passed_over.append(i)
            continue
        chosen.append(i)
        chosen_sets.append(grams)
    return chosen + passed_over[: count - len(chosen)]
