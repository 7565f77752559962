"""Token-level evaluation sums shared by the trainer's eval and `nlm eval`: CE, teacher KL, top-1 agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nlm.distill.divergences import forward_kl
from nlm.distill.targets import MixtureLogits, target_logp


@dataclass
class EvalSums:
    """Running sums over evaluated target tokens; `metrics()` turns them into averages."""

    tokens: int = 0
    ce: float = 0.0
    correct: int = 0
    kl: float = 0.0
    agree: int = 0
    with_teacher: bool = False

    def add_rows(self, student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | MixtureLogits | None = None) -> None:
        """Add target rows: student logits [n, v], their labels [n], and the teacher's logits [n, v] (or a
        mixture of teachers) if any."""
        student = student.float()
        self.tokens += targets.numel()
        self.ce += F.cross_entropy(student, targets, reduction="sum").item()
        self.correct += (student.argmax(-1) == targets).sum().item()
        if teacher is not None:
            self.with_teacher = True
            teacher_logp = target_logp(teacher, 1.0)
            self.kl += forward_kl(teacher_logp, F.log_softmax(student, -1)).sum().item()
            self.agree += (student.argmax(-1) == teacher_logp.argmax(-1)).sum().item()

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        loss = self.ce / n
        out = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "token_accuracy": self.correct / n, "tokens": self.tokens}
        if self.with_teacher:
            out["teacher_kl"] = self.kl / n
            out["teacher_agreement"] = self.agree / n
        return out


def score_batch(sums: EvalSums, model: Any, inputs: dict[str, torch.Tensor], vocab_width: int, *,
                teacher: Any | None = None, chunked: bool = True, chunk_tokens: int | None = None,
                model_for_head: Any | None = None) -> Any:
    """Add one batch's target tokens to `sums`; returns the model's outputs.

    `teacher` is a Teacher whose rows are whole distributions (live or ensemble), or None. `chunked` builds logits only for target rows, a chunk at a time
    (as the fused loss does), so evaluation never holds [batch, seq, vocab] logits; models that post-process
    their logits must pass chunked=False. `model_for_head` is the unwrapped model when `model` is a
    distributed wrapper.
    """
    from nlm.distill.fused import chunk_rows
    from nlm.models.heads import capture_hidden

    shifted_labels = inputs["labels"][:, 1:]
    mask = shifted_labels != -100
    targets = shifted_labels[mask]
    if not chunked:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        student = outputs.logits[:, :-1, :vocab_width][mask]  # [n, V]
        sums.add_rows(student, targets, teacher.signal(inputs, mask, student.device, full_logits=True).all_rows() if teacher is not None else None)
        return outputs
    with capture_hidden(model_for_head if model_for_head is not None else model) as (store, head):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
    rows = store["hidden"][:, :-1][mask]  # [n, H]
    teacher_rows = teacher.signal(inputs, mask, rows.device).rows if teacher is not None else None
    step = chunk_tokens or chunk_rows(vocab_width)
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        sums.add_rows(head(rows[start:end])[..., :vocab_width], targets[start:end],
                      teacher_rows(start, end) if teacher_rows is not None else None)
    return outputs
