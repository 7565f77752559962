"""Comparing two models whose tokenizers differ: per-byte figures over the same text and an aligned divergence.

Per-token loss and perplexity are not comparable across tokenizers (a coarser tokenizer has fewer, harder
tokens). Per-byte figures are: each model's total negative log-likelihood of the same target text, divided by
that text's UTF-8 bytes, in bits. The aligned divergence is ULD at the aligned group starts (τ = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nlm.distill.cross_vocab import uld
from nlm.distill.engines.aligned import group_rows
from nlm.distill.engines.chunks import chunk_rows
from nlm.models.heads import capture_hidden


@dataclass
class CrossEvalSums:
    student_nll: float = 0.0
    teacher_nll: float = 0.0
    target_bytes: int = 0
    groups: int = 0
    uld: float = 0.0

    def metrics(self) -> dict[str, float]:
        per_byte = 1.0 / (max(self.target_bytes, 1) * math.log(2))
        return {
            "bits_per_byte": self.student_nll * per_byte,
            "teacher_bits_per_byte": self.teacher_nll * per_byte,
            "teacher_aligned_uld": self.uld / max(self.groups, 1),
            "aligned_groups": self.groups,
            "target_bytes": self.target_bytes,
        }


def _nll_and_hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, width: int) -> tuple[float, torch.Tensor, Any]:
    """Σ NLL over the target rows (chunked: no full logits), and the final hidden states."""
    with capture_hidden(model) as (store, head):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = store["hidden"]
    keep = labels[:, 1:] != -100
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
    total = 0.0
    step = chunk_rows(width)
    for start in range(0, rows.shape[0], step):
        logits = head(rows[start : start + step])[..., :width].float()
        total += F.cross_entropy(logits, targets[start : start + step], reduction="sum").item()
    return total, hidden, head


@torch.no_grad()
def score_cross_batch(sums: CrossEvalSums, student: Any, teacher: Any, batch: dict[str, torch.Tensor],
                      student_width: int, teacher_width: int, student_tokenizer: Any) -> None:
    """Add one paired batch (see `nlm.data.paired`) to `sums`."""
    s_nll, s_hidden, s_head = _nll_and_hidden(student, batch["input_ids"], batch["attention_mask"], batch["labels"], student_width)
    t_nll, t_hidden, t_head = _nll_and_hidden(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                              batch["teacher_labels"], teacher_width)
    sums.student_nll += s_nll
    sums.teacher_nll += t_nll
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        text = student_tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100], skip_special_tokens=True)
        sums.target_bytes += len(text.encode("utf-8"))
    s_rows, t_rows = group_rows(s_hidden, batch["align_student"]), group_rows(t_hidden, batch["align_teacher"])
    step = chunk_rows(max(student_width, teacher_width))
    for start in range(0, s_rows.shape[0], step):
        s_logits = s_head(s_rows[start : start + step])[..., :student_width].float()
        t_logits = t_head(t_rows[start : start + step])[..., :teacher_width].float().to(s_logits.device)
        sums.uld += uld(s_logits, t_logits).sum().item()
    sums.groups += int(s_rows.shape[0])
