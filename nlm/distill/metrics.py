"""Token-level evaluation sums shared by the trainer's eval and `nlm eval`: CE, teacher KL, top-1 agreement."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nlm.distill.divergences import forward_kl
from nlm.distill.targets import MixtureLogits, SparseTargets, tail_logp, target_logp

# Columns of the per-example sums: target tokens, CE, correct top-1, teacher KL, teacher agreement.
FIGURES = ("tokens", "ce", "correct", "kl", "agree")


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
        self.add(row_figures(student, targets, teacher).sum(0), with_teacher=teacher is not None)

    def add(self, sums: torch.Tensor, with_teacher: bool) -> None:
        """Add a [5] (or [b, 5]) tensor of sums in FIGURES order."""
        totals = sums.reshape(-1, len(FIGURES)).sum(0).tolist()
        self.tokens += round(totals[0])
        self.ce += totals[1]
        self.correct += round(totals[2])
        self.kl += totals[3]
        self.agree += round(totals[4])
        self.with_teacher = self.with_teacher or with_teacher

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        loss = self.ce / n
        out = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "token_accuracy": self.correct / n, "tokens": self.tokens}
        if self.with_teacher:
            out["teacher_kl"] = self.kl / n
            out["teacher_agreement"] = self.agree / n
        return out


def row_figures(student: torch.Tensor, targets: torch.Tensor,
                teacher: torch.Tensor | MixtureLogits | SparseTargets | None = None) -> torch.Tensor:
    """Per target row [n, 5] in FIGURES order (float64), from student logits [n, v], labels [n], teacher [n, v]
    (or a mixture of teachers). A served teacher's top-K rows (`SparseTargets`) give the KL over its K + 1
    buckets (the top K and the tail: a lower bound of the full KL) and agreement with its top-1."""
    student = student.float()
    figures = torch.zeros(targets.numel(), len(FIGURES), dtype=torch.float64, device=student.device)
    figures[:, 0] = 1
    figures[:, 1] = F.cross_entropy(student, targets, reduction="none")
    predicted = student.argmax(-1)
    figures[:, 2] = predicted == targets
    if isinstance(teacher, SparseTargets):
        own = F.log_softmax(student, -1).gather(1, teacher.ids)  # [n, K]: the student's log-probs of the teacher's top K
        mine = torch.cat([own, tail_logp(own).unsqueeze(-1)], dim=-1)  # [n, K+1]
        theirs = teacher.bucket_logp().float()
        figures[:, 3] = forward_kl(theirs, mine)  # buckets without teacher mass (a sampled cache's) count 0
        figures[:, 4] = predicted == teacher.ids[:, 0]
    elif teacher is not None:
        teacher_logp = target_logp(teacher, 1.0)
        figures[:, 3] = forward_kl(teacher_logp, F.log_softmax(student, -1))
        figures[:, 4] = predicted == teacher_logp.argmax(-1)
    return figures


def score_batch(sums: EvalSums, model: Any, inputs: dict[str, torch.Tensor], vocab_width: int, *,
                teacher: Any | None = None, chunked: bool = True, chunk_tokens: int | None = None,
                model_for_head: Any | None = None,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                autocast: Callable[[], AbstractContextManager] | None = None) -> Any:
    """Add one batch's target tokens to `sums`; returns the model's outputs.

    `teacher` is a Teacher whose rows are whole distributions (live or ensemble), or None. `chunked` builds logits only for target rows, a chunk at a time
    (as the fused loss does), so evaluation never holds [batch, seq, vocab] logits; models that post-process
    their logits must pass chunked=False. `model_for_head` is the unwrapped model when `model` is a
    distributed wrapper. `gather` collects the per-example sums [b, 5] of every process (the Trainer passes
    `accelerator.gather_for_metrics`, which also drops the examples repeated to even out the last batch), so
    the figures cover all processes' data. `autocast` is the run's mixed-precision context for the chunked
    head products (the simple path gets it inside the model's forward).
    """
    from nlm.distill.engines.chunks import chunk_rows
    from nlm.models.heads import capture_hidden, sliced_head

    shifted_labels = inputs["labels"][:, 1:]
    mask = shifted_labels != -100
    targets = shifted_labels[mask]
    example = mask.nonzero()[:, 0]  # [n]: the example each target row belongs to
    per_example = torch.zeros(mask.shape[0], len(FIGURES), dtype=torch.float64, device=targets.device)
    if not chunked:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        student = outputs.logits[:, :-1, :vocab_width][mask]  # [n, V]
        per_example.index_add_(0, example, row_figures(
            student, targets,
            teacher.signal(inputs, mask, student.device, full_logits=True).all_rows() if teacher is not None else None))
    else:
        unwrapped = model_for_head if model_for_head is not None else model
        with capture_hidden(unwrapped) as (store, _):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        rows = store["hidden"][:, :-1][mask]  # [n, H]
        head = sliced_head(unwrapped, vocab_width)
        teacher_rows = teacher.signal(inputs, mask, rows.device).rows if teacher is not None else None
        step = chunk_tokens or chunk_rows(vocab_width, rows.device)
        for start in range(0, rows.shape[0], step):
            end = min(start + step, rows.shape[0])
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = head(rows[start:end])  # [c, V]
            per_example.index_add_(0, example[start:end], row_figures(
                logits, targets[start:end], teacher_rows(start, end) if teacher_rows is not None else None))
    sums.add(gather(per_example) if gather is not None else per_example, with_teacher=teacher is not None)
    return outputs
