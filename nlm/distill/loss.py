"""The distillation objective at each target token:

    total = (1 - α)·CE(student, label) + α·τ²·D(softmax(teacher/τ), softmax(student/τ))

averaged over tokens whose label is not `ignore_index`. The τ² factor keeps the gradient scale of the
soft term independent of τ (Hinton et al., 2015). Both terms stay in the autograd graph.

Two teacher forms share one summation: dense teacher logits, or a sparse target read from the teacher
cache (top-k log-probabilities plus the remaining mass, see docs/TEACHER_CACHE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nlm.distill.divergences import token_divergence


@dataclass
class LossParts:
    total: torch.Tensor  # differentiable
    task: torch.Tensor  # CE part, before the (1-α) weight (differentiable in the simple path)
    distill: torch.Tensor  # divergence part, before the α·τ² weight (differentiable in the simple path)
    tokens: int  # target tokens that contributed


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


@dataclass
class SparseTargets:
    """Teacher targets for n tokens from the cache: top-k ids, their log-probs at τ, log of the remaining mass."""

    ids: torch.Tensor  # [n, k] int64
    logp: torch.Tensor  # [n, k] float
    tail_logp: torch.Tensor  # [n] float

    def rows(self, start: int, end: int) -> SparseTargets:
        return SparseTargets(self.ids[start:end], self.logp[start:end], self.tail_logp[start:end])


def tail_logp(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(top_logp)) per row: the mass outside the top-k [n, k], as log(-expm1(logsumexp)) so
    it stays accurate when the top-k hold nearly all the mass (the clamp keeps it finite when they hold all)."""
    covered = torch.logsumexp(top_logp, dim=-1).clamp(max=-1e-7)
    return torch.log(-torch.expm1(covered))


def _bucket_logp(student_logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probs over the teacher's k tokens plus one tail bucket: [n, k+1]."""
    top = student_logp.gather(-1, ids)  # [n, k]
    return torch.cat([top, tail_logp(top).unsqueeze(-1)], dim=-1)


def summed_parts(
    student: torch.Tensor, teacher: torch.Tensor | SparseTargets | None, targets: torch.Tensor, settings: LossSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ divergence) over the rows of `student` [n, v] (fp32/fp64) and their targets [n]."""
    task = F.cross_entropy(student, targets, reduction="sum")
    if settings.alpha == 0 or teacher is None:
        return task, student.new_zeros(())
    student_logp = F.log_softmax(student / settings.temperature, dim=-1)
    if isinstance(teacher, SparseTargets):
        # Both distributions coarsened to k+1 buckets (the teacher's top-k tokens and "everything else").
        student_logp = _bucket_logp(student_logp, teacher.ids)
        teacher_logp = torch.cat([teacher.logp, teacher.tail_logp.unsqueeze(-1)], dim=-1).to(student.dtype)
    else:
        teacher_logp = F.log_softmax(teacher.to(student.dtype) / settings.temperature, dim=-1)
    per_token = token_divergence(settings.divergence, teacher_logp, student_logp,
                                 jsd_beta=settings.jsd_beta, skew_lambda=settings.skew_lambda)
    return task, per_token.sum()


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


def combine(task_sum: torch.Tensor, distill_sum: torch.Tensor, count: int, settings: LossSettings,
            normalizer: float | torch.Tensor | None) -> LossParts:
    denominator = normalizer if normalizer is not None else max(count, 1)
    task, distill = task_sum / denominator, distill_sum / denominator
    total = (1 - settings.alpha) * task + settings.alpha * settings.temperature**2 * distill
    return LossParts(total=total, task=task, distill=distill, tokens=count)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    normalizer: float | torch.Tensor | None = None,
) -> LossParts:
    """Combined CE + distillation loss from full logits (the simple path).

    Logits are [b, s, v] (or [n, v]) and already aligned with `labels` [b, s] (or [n]): for a causal LM,
    pass logits[:, :-1] with labels[:, 1:]. Teacher and student logits must have the same width v; sparse
    cached targets must have one row per non-ignored label, in order. Computation is in fp32 (fp64 stays
    fp64) whatever the input dtype. `normalizer` replaces the token count as the denominator, so gradient
    accumulation can average over all tokens of an optimiser step.
    """
    settings = LossSettings(alpha, temperature, divergence, jsd_beta, skew_lambda)
    if isinstance(teacher_logits, SparseTargets):
        flat = labels.reshape(-1)
        keep = flat != ignore_index
        student, targets, teacher = student_logits.reshape(-1, student_logits.shape[-1])[keep], flat[keep], teacher_logits
    else:
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"vocabulary widths differ: student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]}")
        student, teacher, targets = select_targets(student_logits, teacher_logits, labels, ignore_index)
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    student = student.to(compute_dtype)
    task_sum, distill_sum = summed_parts(student, teacher, targets, settings)
    return combine(task_sum, distill_sum, targets.numel(), settings, normalizer)
