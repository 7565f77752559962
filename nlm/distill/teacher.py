"""Teachers supply the target distribution for the target tokens of a batch.

Both kinds answer the same two questions for the trainer: the targets of the selected rows for the
simple path (`dense_rows`), and a chunk source for the fused path (`row_source`).
"""

from __future__ import annotations

from typing import Any

import torch

from nlm.distill.cache import CacheMismatchError, TeacherCache
from nlm.distill.fused import TeacherRows, dense_teacher_rows, sparse_teacher_rows
from nlm.distill.loss import SparseTargets
from nlm.models.heads import capture_hidden, sliced_head
from nlm.models.loading import freeze


class LiveTeacher:
    """A frozen causal LM on its own device and dtype, run under no_grad."""

    def __init__(self, model: Any, device: torch.device | str, vocab_width: int) -> None:
        self.model = freeze(model).to(device)
        self.device = torch.device(device)
        self.vocab_width = vocab_width

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, vocab_width] logits (padding rows of the head dropped), on the teacher's device."""
        out = self.model(input_ids=input_ids.to(self.device), use_cache=False,
                         attention_mask=attention_mask.to(self.device) if attention_mask is not None else None)
        return out.logits[..., : self.vocab_width]

    def dense_rows(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[n, V] teacher logits of the target rows (mask [b, s-1] over shifted positions), on `device`."""
        return self.logits(inputs["input_ids"], inputs.get("attention_mask"))[:, :-1][mask.to(self.device)].to(device)

    @torch.no_grad()
    def row_source(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> TeacherRows:
        attention = inputs.get("attention_mask")
        with capture_hidden(self.model) as (store, _):
            self.model(input_ids=inputs["input_ids"].to(self.device), use_cache=False,
                       attention_mask=attention.to(self.device) if attention is not None else None)
        hidden = store["hidden"][:, :-1][mask.to(self.device)]  # [n, H_teacher]
        # weight[:V] only: a padded head's extra rows are never multiplied
        return dense_teacher_rows(hidden, sliced_head(self.model, self.vocab_width), self.vocab_width, device)


class CachedTeacher:
    """Targets read from an offline teacher cache by example index; no teacher model is loaded."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.vocab_width = cache.vocab_size

    def dense_rows(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> SparseTargets:
        indices = inputs["index"].tolist()
        # Example by example, every batch: equal totals could still hide rows shifted between examples.
        expected, found = mask.sum(1).tolist(), self.cache.example_counts(indices)
        for index, want, have in zip(indices, expected, found, strict=True):
            if want != have:
                raise CacheMismatchError(
                    f"teacher cache {self.cache.directory}: example {index} has {have} cached target tokens but "
                    f"{want} in this run's data; the cache was built from other data or settings: rebuild it")
        return self.cache.targets(indices, device)

    def row_source(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> TeacherRows:
        return sparse_teacher_rows(self.dense_rows(inputs, mask, device))
