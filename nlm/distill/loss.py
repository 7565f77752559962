"""The distillation objective at each target token:

    total = (1 - α)·CE(student, label) + α·τ²·D(softmax(teacher/τ), softmax(student/τ))

averaged over tokens whose label is not `ignore_index`. The τ² factor keeps the gradient scale of the
soft term independent of τ (Hinton et al., 2015). Both terms stay in the autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nlm.distill.divergences import token_divergence


@dataclass
class LossParts:
    total: torch.Tensor  # differentiable
    task: torch.Tensor  # differentiable CE part, before the (1-α) weight
    distill: torch.Tensor  # differentiable divergence part, before the α·τ² weight
    tokens: int  # target tokens that contributed


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


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
    """Combined CE + distillation loss.

    Logits are [b, s, v] (or [n, v]) and already aligned with `labels` [b, s] (or [n]): for a causal LM,
    pass logits[:, :-1] with labels[:, 1:]. Teacher and student logits must have the same width v.
    Computation is in fp32 (fp64 stays fp64) whatever the input dtype. `normalizer` replaces the token
    count as the denominator, so gradient accumulation can average over all tokens of an optimiser step.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"vocabulary widths differ: student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]}")
    student, teacher, targets = select_targets(student_logits, teacher_logits, labels, ignore_index)
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    student, teacher = student.to(compute_dtype), teacher.to(compute_dtype)  # [n, v]
    count = targets.numel()
    denominator = normalizer if normalizer is not None else max(count, 1)

    task = F.cross_entropy(student, targets, reduction="sum") / denominator
    if alpha > 0:
        student_logp = F.log_softmax(student / temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher / temperature, dim=-1)
        per_token = token_divergence(divergence, teacher_logp, student_logp, jsd_beta=jsd_beta, skew_lambda=skew_lambda)
        distill = per_token.sum() / denominator
    else:
        distill = student.new_zeros(())
    total = (1 - alpha) * task + alpha * temperature**2 * distill
    return LossParts(total=total, task=task, distill=distill, tokens=count)
