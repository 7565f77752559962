"""The distillation objective at each target token (the shorthand of `nlm.distill.objective`):

    total = (1 - α)·CE(student, label) + α·τ²·D(softmax(teacher/τ), softmax(student/τ))

averaged over tokens whose label is not `ignore_index`. The τ² factor keeps the gradient scale of the
soft term independent of τ (Hinton et al., 2015). Both terms stay in the autograd graph.

Teacher targets come in the row forms of `nlm.distill.targets` (dense logits, a mixture of teachers, or
sparse cached top-k). This module is the simple engine: full logits of the target rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nlm.distill.objective import Objective, shorthand
from nlm.distill.targets import SparseTargets, TeacherTargets, tail_logp

__all__ = ["LossParts", "LossSettings", "SparseTargets", "combine", "combine_terms", "distillation_loss",
           "objective_from_settings", "select_targets", "tail_logp"]


@dataclass
class LossParts:
    total: torch.Tensor  # differentiable
    task: torch.Tensor  # CE part, before the (1-α) weight (differentiable in the simple path)
    distill: torch.Tensor  # divergence part, before the α·τ² weight (differentiable in the simple path)
    tokens: int  # target tokens that contributed
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # every term's mean, before its weight


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1

    @classmethod
    def from_config(cls, config: object) -> LossSettings:
        return cls(**{name: getattr(config, name) for name in ("alpha", "temperature", "divergence", "jsd_beta", "skew_lambda")})


def objective_from_settings(settings: LossSettings) -> Objective:
    """`[ce: 1-α, kd: α·τ²]` with a fixed temperature (`nlm.distill.objective.shorthand`)."""
    return shorthand(settings.alpha, settings.temperature, settings.divergence, jsd_beta=settings.jsd_beta,
                     skew_lambda=settings.skew_lambda)


def select_targets(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the [.., v] logits whose label counts, flattened to [n, v]; labels to [n]."""
    vocab = student_logits.shape[-1]
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    student = student_logits.reshape(-1, vocab)[keep]  # [n, v]
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep.to(teacher_logits.device)]
    return student, teacher.to(student.device), labels[keep]


def combine_terms(objective: Objective, sums: list[torch.Tensor], count: int,
                  normalizer: float | torch.Tensor | None) -> LossParts:
    """Weighted total of the row terms' sums, each divided by the normaliser (default: the token count)."""
    denominator = normalizer if normalizer is not None else max(count, 1)
    means = [s / denominator for s in sums]
    total = None
    for weighted, mean in zip(objective.row_terms, means, strict=True):
        total = weighted.weight * mean if total is None else total + weighted.weight * mean
    terms = {w.term.name: m for w, m in zip(objective.row_terms, means, strict=True)}
    zero = means[0].new_zeros(()) if means else torch.zeros(())
    return LossParts(total=total if total is not None else zero, task=terms.get("ce", zero),
                     distill=terms.get("kd", zero), tokens=count, terms=terms)


def add_batch_terms(objective: Objective, parts: LossParts, student_hidden: dict[int, torch.Tensor],
                    teacher_hidden: dict[int, torch.Tensor], normalizer: float | torch.Tensor | None) -> LossParts:
    """Add the objective's batch terms (hidden states of the target rows, per layer) to the row terms' parts."""
    denominator = normalizer if normalizer is not None else max(parts.tokens, 1)
    total = parts.total
    for weighted in objective.batch_terms:
        if weighted.weight == 0:
            continue
        mean = weighted.term.batch_sum(student_hidden, teacher_hidden) / denominator
        total = total + weighted.weight * mean
        parts.terms[weighted.term.name] = mean.detach()
    parts.total = total
    return parts


def combine(task_sum: torch.Tensor, distill_sum: torch.Tensor, count: int, settings: LossSettings,
            normalizer: float | torch.Tensor | None) -> LossParts:
    return combine_terms(objective_from_settings(settings), [task_sum, distill_sum], count, normalizer)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: TeacherTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    normalizer: float | torch.Tensor | None = None,
    objective: Objective | None = None,
) -> LossParts:
    """Combined CE + distillation loss from full logits (the simple engine).

    Logits are [b, s, v] (or [n, v]) and already aligned with `labels` [b, s] (or [n]): for a causal LM,
    pass logits[:, :-1] with labels[:, 1:]. Teacher and student logits must have the same width v; sparse
    cached targets must have one row per non-ignored label, in order. Computation is in fp32 (fp64 stays
    fp64) whatever the input dtype. `normalizer` replaces the token count as the denominator, so gradient
    accumulation can average over all tokens of an optimiser step. `objective` replaces the shorthand
    (alpha, temperature, divergence, ...) by any list of row terms.
    """
    if objective is None:
        objective = objective_from_settings(LossSettings(alpha, temperature, divergence, jsd_beta, skew_lambda))
    flat = labels.reshape(-1)
    keep = flat != ignore_index
    if isinstance(teacher_logits, torch.Tensor):
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"vocabulary widths differ: student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]}")
        student, teacher, targets = select_targets(student_logits, teacher_logits, labels, ignore_index)
    else:
        student, targets, teacher = student_logits.reshape(-1, student_logits.shape[-1])[keep], flat[keep], teacher_logits
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    student = student.to(compute_dtype)
    return combine_terms(objective, objective.row_sums(student, teacher, targets), targets.numel(), normalizer)
