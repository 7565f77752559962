"""The teacher cache for a teacher with another tokenizer (`distillation.cross_tokenizer: alm`).

`alm` needs one number per aligned group from the teacher: the log-likelihood of the group's text under it
(`nlm.distill.engines.aligned`). So the cache stores, per example, its groups' log-likelihoods (float32, 4 bytes
per group) in the same manifest + safetensors-shard layout as the top-k cache (`nlm.distill.cache`), with
`kind: cross_alm`, and keeps the teacher's tokenizer in `teacher_tokenizer/`: the training run tokenises
and aligns its data with it, without loading the teacher. The fingerprint records both tokenizers.

`uld` and `hybrid` compare whole next-token distributions at each group start; a cache of those would be a
top-k cache over the teacher's vocabulary, which these methods cannot use faithfully (ULD sorts the whole
distribution), so they keep needing the live teacher.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nlm.data.tokenize import tokenizer_fingerprint
from nlm.distill.aligned_teacher import AlignedTeacher
from nlm.distill.cache import FORMAT, VERSION, TeacherCache
from nlm.distill.engines.aligned import CrossSettings, TeacherGroups
from nlm.distill.teacher import InProcessTeacher
from nlm.errors import ConfigError

KIND = "cross_alm"
TEACHER_TOKENIZER = "teacher_tokenizer"
BYTES_PER_GROUP = 4


def check_method(method: str | None) -> None:
    if method and method != "alm":
        raise ConfigError(f"distillation.cross_tokenizer={method} cannot use a teacher cache: it compares the teacher's "
                          "whole distribution at each group start; use cross_tokenizer=alm (its cache stores one "
                          "likelihood per aligned group) or pass --teacher_model")


def cross_fingerprint(student_tokenizer: Any) -> dict[str, Any]:
    """What a cross-tokenizer cache adds to the top-k cache's fingerprint (whose tokenizer is the teacher's)."""
    return {"cross_tokenizer": "alm", "student_tokenizer": tokenizer_fingerprint(student_tokenizer),
            "student_chat_template": str(getattr(student_tokenizer, "chat_template", None))}


def save_group_shard(path: Path, loglik: torch.Tensor, offsets: torch.Tensor) -> None:
    partial = path.with_suffix(".partial")
    save_file({"loglik": loglik.float().contiguous(), "offsets": offsets.contiguous()}, str(partial),
              metadata={"format": FORMAT, "version": str(VERSION), "kind": KIND})
    os.replace(partial, path)


@torch.no_grad()
def group_shard(teacher: AlignedTeacher, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """[groups] log-likelihoods and [examples + 1] offsets of one shard's batches."""
    values, offsets = [], [0]
    for batch in batches:
        values.append(teacher.groups(batch, torch.device("cpu")).loglik)
        for count in (batch["align_student"] > 0).sum(1).tolist():
            offsets.append(offsets[-1] + int(count))
    return torch.cat(values), torch.tensor(offsets, dtype=torch.int64)


class CachedAlignedTeacher(InProcessTeacher):
    """Group log-likelihoods read from a `cross_alm` cache by example index; no teacher model is loaded."""

    batch_columns = ("index",)
    full_distribution = False
    scores_any_text = False
    hidden_layers = 0
    vocab_map = None
    signal_kind = "groups"  # the Teacher protocol (nlm.distill.teacher): one row per aligned group
    live_model = None
    device = None

    def __init__(self, cache: TeacherCache, teacher_tokenizer: Any) -> None:
        self.cache = cache
        self.paired_tokenizer = teacher_tokenizer
        self.cross = CrossSettings("alm")
        self.vocab_width = cache.vocab_size

    def groups(self, inputs: dict[str, torch.Tensor], device: torch.device) -> TeacherGroups:
        indices = inputs["index"].tolist()
        self.cache.check_counts(indices, (inputs["align_student"] > 0).sum(1).tolist(), unit="groups")
        return TeacherGroups(None, self.cache.tensor_rows("loglik", indices).to(device))

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherGroups:
        if layers:
            raise ValueError("a teacher cache has no hidden states")
        return self.groups(inputs, device)

    def models(self) -> list[Any]:
        return []

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        return None

    def hidden_size(self) -> int:
        raise ValueError("a teacher cache has no hidden states")

    def describe(self) -> dict[str, Any]:
        return {"kind": "cache_cross_tokenizer", "method": "alm", "teacher_cache": str(self.cache.directory),
                "teachers": [self.cache.fingerprint.get("teacher_model")]}


def open_cross_cache(cache: TeacherCache, student_tokenizer: Any, method: str | None) -> CachedAlignedTeacher:
    """A `cross_alm` cache for this run (its fingerprint is checked by the caller)."""
    from nlm.models.loading import load_tokenizer

    check_method(method or "alm")
    if method is None:
        raise ConfigError(f"teacher cache {cache.directory} was built for a teacher with another tokenizer: set "
                          "distillation.cross_tokenizer=alm")
    return CachedAlignedTeacher(cache, load_tokenizer(str(cache.directory / TEACHER_TOKENIZER)))
