"""The cross-tokenizer objective: CE on the student's own labels plus a vocabulary-agnostic distillation term.

    total = (1-α)·CE(student, labels) + α·s·Σ_groups D(teacher group ‖ student group) / N

s = τ² for `uld`/`hybrid` (distributions softened by τ, as in the same-tokenizer loss); s = 1 for `alm`,
which compares the models' own group likelihoods (τ = 1: softening each conditional by τ flattens the
targets towards each other — on the demo task τ = 2 lost 6 points of accuracy against τ = 1).

N is the same normaliser as the same-tokenizer loss (the student's target tokens of the optimiser step), so
with identical tokenizers and `hybrid` the value equals today's forward-KL loss. The CE term runs through the
fused engine (no full logits). `uld`/`hybrid` compare the next-token distributions at the aligned group starts;
`alm` compares each group's likelihood (every token of the group on each side). Both are computed chunk by
chunk under activation checkpointing, so at most one chunk of [c, V] logits per side is alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from nlm.distill.cross_vocab import VocabMap, binary_kl, hybrid, uld
from nlm.distill.engines.base import EngineContext, EngineStep, linear_parts, target_rows
from nlm.distill.engines.chunks import chunk_rows, spans
from nlm.distill.engines.fused import fused_distillation_loss
from nlm.distill.loss import LossParts, LossSettings, combine
from nlm.distill.objective import Objective
from nlm.models.heads import capture_hidden, output_head

# What each method compares: the (softened) distributions at the group starts, or the groups' likelihoods.
CROSS_METHODS = {"uld": "distribution", "hybrid": "distribution", "alm": "likelihood"}


@dataclass(frozen=True)
class CrossSettings:
    method: str = "uld"
    matched_weight: float = 1.0  # hybrid: weight of the exact KL over tokens both vocabularies spell alike
    unmatched_weight: float = 1.0  # hybrid: weight of the ULD term over the rest

    @property
    def needs(self) -> str:
        return CROSS_METHODS[self.method]


@dataclass(frozen=True)
class TeacherGroups:
    """What the teacher hands the cross-tokenizer loss, one row per aligned group (batch-major order)."""

    logits: torch.Tensor | None  # [g, V_teacher] fp32 logits predicting the group's first teacher token
    loglik: torch.Tensor | None  # [g] log-likelihood of the group's teacher tokens (τ = 1)


def group_rows(hidden: torch.Tensor, align: torch.Tensor) -> torch.Tensor:
    """[b, s, H] hidden states and [b, G] group-start positions (-1 = none) -> [g, H] predicting rows."""
    batch, group = (align > 0).nonzero(as_tuple=True)
    positions = align[batch, group] - 1  # the position whose next-token distribution predicts the group start
    return hidden[batch.to(hidden.device), positions.to(hidden.device)]


def group_tokens(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[b, G] group starts/ends (-1 = none) -> (batch, position, group) of every token of every group, flat.

    `group` numbers the groups in the same batch-major order as `group_rows`."""
    batch, index = (starts > 0).nonzero(as_tuple=True)
    first, lengths = starts[batch, index], (ends - starts)[batch, index]
    group = torch.repeat_interleave(torch.arange(batch.numel(), device=starts.device), lengths)
    within = torch.arange(group.numel(), device=starts.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return batch.repeat_interleave(lengths), first.repeat_interleave(lengths) + within, group


def one_to_one(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[g] True where a group is a single token on both sides."""
    valid = inputs["align_student"] > 0
    single = (inputs["align_student_end"] - inputs["align_student"] == 1) & (inputs["align_teacher_end"] - inputs["align_teacher"] == 1)
    return single[valid]


def _chunked_sum(rows: torch.Tensor, per_chunk: Callable[..., torch.Tensor], *others: torch.Tensor, chunk: int,
                 shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Σ per_chunk(rows[c], others[c]...) over chunks (each of `shape`); with grad, each chunk's logits are
    recomputed in backward rather than kept."""
    total = rows.new_zeros(shape, dtype=torch.float32)
    for start, end in spans(rows.shape[0], chunk):
        args = (rows[start:end], *(other[start:end] for other in others))
        if torch.is_grad_enabled() and rows.requires_grad:
            total = total + checkpoint(per_chunk, *args, use_reentrant=False)
        else:
            total = total + per_chunk(*args)
    return total


def group_loglik(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                 starts: torch.Tensor, ends: torch.Tensor, width: int, chunk: int) -> torch.Tensor:
    """[g] Σ over each group's tokens of log softmax(logits)[token], chunk by chunk (differentiable)."""
    batch, positions, group = group_tokens(starts.to(hidden.device), ends.to(hidden.device))
    rows, tokens = hidden[batch, positions - 1], input_ids.to(hidden.device)[batch, positions]
    count = int(starts.gt(0).sum())

    def chunk_logprobs(h: torch.Tensor, ids: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        logits = head(h)[..., :width].float()
        picked = logits.gather(-1, ids[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return torch.zeros(count, dtype=torch.float32, device=h.device).index_add(0, groups, picked)

    return _chunked_sum(rows, chunk_logprobs, tokens, group, chunk=chunk, shape=(count,))


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, settings: LossSettings,
                    cross: CrossSettings, vocab: VocabMap | None, single: torch.Tensor | None = None) -> torch.Tensor:
    """[g] divergences between aligned student and teacher rows, both softened by τ."""
    if cross.method == "uld":
        return uld(student_logits, teacher_logits, settings.temperature)
    if vocab is None:
        raise ValueError("cross_tokenizer=hybrid needs a vocabulary map")
    return hybrid(student_logits, teacher_logits, vocab, settings.temperature, cross.matched_weight, cross.unmatched_weight,
                  one_to_one=single)


def aligned_distill_sum(student_rows: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], teacher_logits: torch.Tensor,
                        settings: LossSettings, cross: CrossSettings, vocab: VocabMap | None, student_width: int,
                        chunk_size: int | None = None, single: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over groups of D, chunk by chunk; each chunk's student logits are recomputed in backward, not kept."""
    rows = chunk_size or chunk_rows(max(student_width, teacher_logits.shape[-1]))
    if single is None:
        single = torch.ones(student_rows.shape[0], dtype=torch.bool, device=student_rows.device)

    def chunk_sum(hidden: torch.Tensor, teacher: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)[..., :student_width].float()
        return divergence_rows(logits, teacher, settings, cross, vocab, one).sum()

    return _chunked_sum(student_rows, chunk_sum, teacher_logits, single.to(student_rows.device), chunk=rows)


def cross_tokenizer_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    inputs: dict[str, torch.Tensor],
    teacher: TeacherGroups | None,
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
    """The whole objective from the student's final hidden states [b, s, H] and what the teacher says of each group."""
    mask = inputs["labels"][:, 1:] != -100
    rows = hidden[:, :-1][mask]  # [n, H]
    targets = inputs["labels"][:, 1:][mask]
    denominator = normalizer if normalizer is not None else max(rows.shape[0], 1)
    ce = fused_distillation_loss(rows, head, targets, lambda start, end: None, vocab_width=vocab_width,
                                 settings=LossSettings(alpha=0.0, temperature=settings.temperature),
                                 normalizer=denominator, head_parameters=head_parameters, linear_head=linear_head,
                                 chunk_size=chunk_size)
    if teacher is None or settings.alpha == 0:
        return ce
    if teacher.loglik is not None:
        student_loglik = group_loglik(hidden, head, inputs["input_ids"], inputs["align_student"], inputs["align_student_end"],
                                      vocab_width, chunk_size or chunk_rows(vocab_width))
        distill_sum = binary_kl(teacher.loglik, student_loglik).sum()
    else:
        assert teacher.logits is not None
        group_hidden = group_rows(hidden, inputs["align_student"])
        distill_sum = aligned_distill_sum(group_hidden, head, teacher.logits, settings, cross, vocab, vocab_width, chunk_size,
                                          single=one_to_one(inputs))
    scale = settings.temperature**2 if cross.needs == "distribution" else 1.0
    total = (1 - settings.alpha) * ce.total + settings.alpha * scale * distill_sum / float(denominator)
    parts = combine(ce.task * float(denominator), distill_sum.detach(), ce.tokens, settings, denominator)
    return LossParts(total=total, task=parts.task, distill=parts.distill, tokens=ce.tokens)


class GroupTeacher(Protocol):
    """What the aligned engine reads of a teacher whose `signal_kind` is "groups"."""

    cross: CrossSettings  # which divergence compares the two vocabularies
    vocab_map: VocabMap | None  # tokens both vocabularies spell alike (hybrid)

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Any = (), full_logits: bool = False) -> TeacherGroups: ...


class AlignedEngine:
    """A teacher with its own tokenizer: CE (fused) + the cross-tokenizer term over the aligned groups. Steps
    whose objective needs no teacher (α = 0) go to `plain`, the engine `loss_impl` chose."""

    name = "aligned"

    def __init__(self, context: EngineContext, plain: Any) -> None:
        self.context, self.plain = context, plain

    def step(self, model: Any, inputs: dict[str, torch.Tensor], objective: Objective, teacher: GroupTeacher | None,
             normalizer: Any) -> EngineStep:
        if teacher is None or "teacher" not in objective.needs:
            return self.plain.step(model, inputs, objective, None, normalizer)
        if objective.alpha is None or objective.temperature is None:
            raise ValueError("the cross-tokenizer loss takes the alpha/temperature objective")
        context = self.context
        mask, _ = target_rows(inputs)
        unwrapped = context.unwrap(model)
        head_module = output_head(unwrapped)
        with capture_hidden(unwrapped) as (store, head):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        hidden = store["hidden"]  # [b, s, H]
        parts = cross_tokenizer_loss(
            hidden, head, inputs, teacher.signal(inputs, mask, hidden.device),
            LossSettings(alpha=objective.alpha, temperature=objective.temperature), teacher.cross, teacher.vocab_map,
            vocab_width=context.vocab_width, normalizer=normalizer,
            head_parameters=[p for p in head_module.parameters() if p.requires_grad], chunk_size=context.chunk_tokens,
            linear_head=linear_parts(head_module),
        )
        rows, width = hidden[:, :-1][mask], context.vocab_width
        return EngineStep(parts, outputs, lambda start, end: head_module(rows[start:end].detach())[..., :width])
