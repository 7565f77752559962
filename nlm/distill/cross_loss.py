"""The cross-tokenizer objective: CE on the student's own labels plus a vocabulary-agnostic distillation term.

    total = (1-α)·CE(student, labels) + α·τ²·Σ_groups D(teacher group-start ‖ student group-start) / N

N is the same normaliser as the same-tokenizer loss (the student's target tokens of the optimiser step), so
with identical tokenizers and `hybrid` the value equals today's forward-KL loss. The CE term runs through the
fused engine (no full logits); the distillation term only needs logits at the aligned group starts, computed
chunk by chunk under activation checkpointing, so at most one chunk of [c, V] logits per side is alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from nlm.distill.cross_vocab import VocabMap, hybrid, uld
from nlm.distill.fused import chunk_rows, fused_distillation_loss
from nlm.distill.loss import LossParts, LossSettings, combine
from nlm.models.heads import capture_hidden

CROSS_METHODS = ("uld", "hybrid")


@dataclass(frozen=True)
class CrossSettings:
    method: str = "uld"
    matched_weight: float = 1.0  # hybrid: weight of the exact KL over tokens both vocabularies spell alike
    unmatched_weight: float = 1.0  # hybrid: weight of the ULD term over the rest


def group_rows(hidden: torch.Tensor, align: torch.Tensor) -> torch.Tensor:
    """[b, s, H] hidden states and [b, G] group-start positions (-1 = none) -> [g, H] predicting rows."""
    batch, group = (align > 0).nonzero(as_tuple=True)
    positions = align[batch, group] - 1  # the position whose next-token distribution predicts the group start
    return hidden[batch.to(hidden.device), positions.to(hidden.device)]


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, settings: LossSettings,
                    cross: CrossSettings, vocab: VocabMap | None) -> torch.Tensor:
    """[g] divergences between aligned student and teacher rows, both softened by τ."""
    if cross.method == "uld":
        return uld(student_logits, teacher_logits, settings.temperature)
    if vocab is None:
        raise ValueError("cross_tokenizer=hybrid needs a vocabulary map")
    return hybrid(student_logits, teacher_logits, vocab, settings.temperature, cross.matched_weight, cross.unmatched_weight)


def aligned_distill_sum(student_rows: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], teacher_logits: torch.Tensor,
                        settings: LossSettings, cross: CrossSettings, vocab: VocabMap | None, student_width: int,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Σ over groups of D, chunk by chunk; each chunk's student logits are recomputed in backward, not kept."""
    rows = chunk_size or chunk_rows(max(student_width, teacher_logits.shape[-1]))
    total = student_rows.new_zeros((), dtype=torch.float32)

    def chunk_sum(hidden: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)[..., :student_width].float()
        return divergence_rows(logits, teacher, settings, cross, vocab).sum()

    for start in range(0, student_rows.shape[0], rows):
        hidden, teacher = student_rows[start : start + rows], teacher_logits[start : start + rows]
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(chunk_sum, hidden, teacher, use_reentrant=False)
        else:
            total = total + chunk_sum(hidden, teacher)
    return total


class AlignedTeacher:
    """A frozen teacher with its own tokenizer: logits at the aligned group starts of its own token ids.

    `paired_tokenizer` tells the data layer to add the teacher's tokenisation and the alignment to each
    example; `cross` and `vocab_map` say which divergence compares the two vocabularies.
    """

    # The Teacher protocol's attributes (nlm.distill.teacher); the trainer takes this teacher's own
    # cross-tokenizer path, as its rows follow another tokenisation.
    batch_columns: tuple[str, ...] = ()
    full_distribution = False
    hidden_layers = 0

    def models(self) -> list[Any]:
        return [self.model]

    def hidden_size(self) -> int:
        raise ValueError("hidden-state distillation needs a teacher sharing the student's tokenizer")

    def __init__(self, model: Any, device: torch.device | str, vocab_width: int, tokenizer: Any = None,
                 cross: CrossSettings | None = None, vocab_map: VocabMap | None = None) -> None:
        from nlm.models.loading import freeze

        self.model = freeze(model).to(device)
        self.device = torch.device(device)
        self.vocab_width = vocab_width
        self.paired_tokenizer = tokenizer
        self.cross = cross or CrossSettings()
        self.vocab_map = vocab_map

    @torch.no_grad()
    def group_logits(self, inputs: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """[g, V_teacher] fp32 logits predicting each group's first teacher token, on `device`."""
        attention = inputs.get("teacher_attention_mask")
        with capture_hidden(self.model) as (store, head):
            self.model(input_ids=inputs["teacher_input_ids"].to(self.device), use_cache=False,
                       attention_mask=attention.to(self.device) if attention is not None else None)
        rows = group_rows(store["hidden"], inputs["align_teacher"].to(self.device))
        return head(rows)[..., : self.vocab_width].float().to(device)

    def describe(self) -> dict[str, Any]:
        return {"kind": "live_cross_tokenizer", "device": str(self.device), "vocab_width": self.vocab_width,
                "method": self.cross.method, "matched_tokens": self.vocab_map.matched if self.vocab_map else None}


def cross_tokenizer_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    inputs: dict[str, torch.Tensor],
    teacher_logits: torch.Tensor | None,
    settings: LossSettings,
    cross: CrossSettings,
    vocab: VocabMap | None,
    *,
    vocab_width: int,
    normalizer: float | torch.Tensor | None = None,
    head_parameters: list[torch.Tensor] | None = None,
    linear_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    chunk_size: int | None = None,
) -> LossParts:
    """The whole objective from the student's final hidden states [b, s, H] and the teacher's group logits."""
    mask = inputs["labels"][:, 1:] != -100
    rows = hidden[:, :-1][mask]  # [n, H]
    targets = inputs["labels"][:, 1:][mask]
    denominator = normalizer if normalizer is not None else max(rows.shape[0], 1)
    ce = fused_distillation_loss(rows, head, targets, lambda start, end: None, vocab_width=vocab_width,
                                 settings=LossSettings(alpha=0.0, temperature=settings.temperature),
                                 normalizer=denominator, head_parameters=head_parameters, linear_head=linear_head,
                                 chunk_size=chunk_size)
    if teacher_logits is None or settings.alpha == 0:
        return ce
    group_hidden = group_rows(hidden, inputs["align_student"])
    distill_sum = aligned_distill_sum(group_hidden, head, teacher_logits, settings, cross, vocab, vocab_width, chunk_size)
    total = (1 - settings.alpha) * ce.total + settings.alpha * settings.temperature**2 * distill_sum / float(denominator)
    parts = combine(ce.task * float(denominator), distill_sum.detach(), ce.tokens, settings, denominator)
    return LossParts(total=total, task=parts.task, distill=parts.distill, tokens=ce.tokens)
