"""Per-example scores from one batched pass of a student and/or a teacher over tokenised examples.

Curriculum learning reads `teacher_loss` / `student_loss` (mean CE of the example's target tokens);
active learning (`nlm data select`) reads the uncertainty figures, all over target (completion) tokens:
  disagreement        1 - fraction of tokens whose top-1 token is the same for teacher and student
  teacher_student_kl  mean KL(teacher ‖ student)
  student_entropy     mean entropy of the student's next-token distribution
  teacher_entropy     mean entropy of the teacher's
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nlm.data.tokenize import PaddingCollator

logger = logging.getLogger(__name__)

FIGURES = ("disagreement", "teacher_student_kl", "student_entropy", "teacher_entropy", "teacher_loss", "student_loss")


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)  # [n]


@torch.no_grad()
def score_examples(
    examples: Sequence[dict[str, Any]] | Any, *, student: Any | None = None, teacher: Any | None = None,
    vocab_width: int, pad_token_id: int = 0, batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Scores of every example (rows with input_ids and labels), in order: name -> [N] float64, plus
    `tokens` (target tokens). Models run in eval mode on their own device; only target rows' logits are kept.

    Batches are formed from examples sorted by length, so padding stays small, and scattered back.
    """
    assert student is not None or teacher is not None
    rows = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]
    n = len(rows)
    sums = {name: np.zeros(n) for name in FIGURES}
    tokens = np.zeros(n)
    collate = PaddingCollator(pad_token_id)
    by_length = sorted(range(n), key=lambda i: len(rows[i]["input_ids"]))
    models = {"student": student, "teacher": teacher}
    for model in models.values():
        if model is not None:
            model.eval()
    for start in range(0, n, batch_size):
        ids = by_length[start : start + batch_size]
        batch = collate([rows[i] for i in ids])
        labels = batch["labels"][:, 1:]  # [b, s-1]
        mask = labels != -100
        owner = torch.tensor(ids).unsqueeze(1).expand_as(labels)[mask]  # [n_tok] example of each target token
        targets = labels[mask]
        logp = {}
        for role, model in models.items():
            if model is None:
                continue
            device = next(model.parameters()).device
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits
            rows_logits = logits[:, :-1, :vocab_width][mask.to(device)].float()  # [n_tok, V]
            del logits
            logp[role] = F.log_softmax(rows_logits, -1).cpu()
        per_token: dict[str, torch.Tensor] = {}
        for role, lp in logp.items():
            per_token[f"{role}_loss"] = -lp.gather(1, targets.unsqueeze(1)).squeeze(1)
            per_token[f"{role}_entropy"] = _entropy(lp)
        if len(logp) == 2:
            t, s = logp["teacher"], logp["student"]
            per_token["disagreement"] = (t.argmax(-1) != s.argmax(-1)).double()
            per_token["teacher_student_kl"] = (t.exp() * (t - s)).sum(-1)
        owner_np = owner.numpy()
        np.add.at(tokens, owner_np, 1)
        for name, values in per_token.items():
            np.add.at(sums[name], owner_np, values.double().numpy())
    out = {name: sums[name] / np.maximum(tokens, 1) for name in FIGURES
           if (name.startswith("student") and student is not None) or (name.startswith("teacher_") and name != "teacher_student_kl" and teacher is not None)
           or (name in ("disagreement", "teacher_student_kl") and student is not None and teacher is not None)}
    out["tokens"] = tokens
    return out
