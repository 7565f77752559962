"""A live teacher with its own tokenizer (`distillation.cross_tokenizer`): its signal is one row per
text-aligned group (docs/CROSS_TOKENIZER.md), read by the aligned engine (`nlm.distill.engines.aligned`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nlm.distill.cross_vocab import VocabMap
from nlm.distill.engines.aligned import CrossSettings, TeacherGroups, group_loglik, group_rows
from nlm.distill.engines.chunks import chunk_rows
from nlm.distill.teacher import InProcessTeacher
from nlm.models.heads import capture_hidden
from nlm.models.loading import freeze


class AlignedTeacher(InProcessTeacher):
    """A frozen teacher with its own tokenizer: logits at the aligned group starts of its own token ids.

    `paired_tokenizer` tells the data layer to add the teacher's tokenisation and the alignment to each
    example; `cross` and `vocab_map` say which divergence compares the two vocabularies.
    """

    # The Teacher protocol (nlm.distill.teacher): its signal is one row per aligned group, so the trainer
    # chooses the aligned engine (nlm.distill.engines.aligned).
    batch_columns: tuple[str, ...] = ()
    full_distribution = False
    scores_any_text = False
    hidden_layers = 0
    signal_kind = "groups"

    @property
    def live_model(self) -> Any:
        return self.model

    def models(self) -> list[Any]:
        return [self.model]

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        self.model = wrap(self.model)

    def hidden_size(self) -> int:
        raise ValueError("hidden-state distillation needs a teacher sharing the student's tokenizer")

    def __init__(self, model: Any, device: torch.device | str, vocab_width: int, tokenizer: Any = None,
                 cross: CrossSettings | None = None, vocab_map: VocabMap | None = None) -> None:
        self.model = freeze(model).to(device)
        self.device = torch.device(device)
        self.vocab_width = vocab_width
        self.paired_tokenizer = tokenizer
        self.cross = cross or CrossSettings()
        self.vocab_map = vocab_map

    @torch.no_grad()
    def groups(self, inputs: dict[str, torch.Tensor], device: torch.device) -> TeacherGroups:
        """What the method needs of each aligned group, on `device`: start logits, or group log-likelihoods."""
        attention = inputs.get("teacher_attention_mask")
        with capture_hidden(self.model) as (store, head):
            self.model(input_ids=inputs["teacher_input_ids"].to(self.device), use_cache=False,
                       attention_mask=attention.to(self.device) if attention is not None else None)
        if self.cross.needs == "likelihood":
            loglik = group_loglik(store["hidden"], head, inputs["teacher_input_ids"], inputs["align_teacher"],
                                  inputs["align_teacher_end"], self.vocab_width, chunk_rows(self.vocab_width))
            return TeacherGroups(None, loglik.to(device))
        rows = group_rows(store["hidden"], inputs["align_teacher"].to(self.device))
        return TeacherGroups(head(rows)[..., : self.vocab_width].float().to(device), None)

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherGroups:
        if layers:
            raise ValueError("hidden-state distillation needs a teacher sharing the student's tokenizer")
        return self.groups(inputs, device)

    def describe(self) -> dict[str, Any]:
        return {"kind": "live_cross_tokenizer", "device": str(self.device), "vocab_width": self.vocab_width,
                "method": self.cross.method, "matched_tokens": self.vocab_map.matched if self.vocab_map else None}
