"""Token-level evaluation sums shared by the trainer's eval and `nlm eval`: CE, teacher KL, top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nlm.distill.divergences import forward_kl
from nlm.distill.loss import select_targets


@dataclass
class EvalSums:
    """Running sums over evaluated target tokens; `metrics()` turns them into averages."""

    tokens: int = 0
    ce: float = 0.0
    correct: int = 0
    kl: float = 0.0
    agree: int = 0
    with_teacher: bool = False

    def add(self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
            ignore_index: int = -100) -> None:
        """Add one batch; logits [b, s, v] already aligned with labels [b, s] (shifted for a causal LM)."""
        reference = teacher_logits if teacher_logits is not None else student_logits
        student, teacher, targets = select_targets(student_logits, reference, labels, ignore_index)
        self.add_rows(student, targets, teacher if teacher_logits is not None else None)

    def add_rows(self, student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        """Add target rows directly: logits [n, v] and labels [n] (the chunked evaluation feeds these)."""
        student = student.float()
        self.tokens += targets.numel()
        self.ce += F.cross_entropy(student, targets, reduction="sum").item()
        self.correct += (student.argmax(-1) == targets).sum().item()
        if teacher is not None:
            self.with_teacher = True
            teacher = teacher.float()
            self.kl += forward_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1)).sum().item()
            self.agree += (student.argmax(-1) == teacher.argmax(-1)).sum().item()

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        loss = self.ce / n
        out = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "token_accuracy": self.correct / n, "tokens": self.tokens}
        if self.with_teacher:
            out["teacher_kl"] = self.kl / n
            out["teacher_agreement"] = self.agree / n
        return out
