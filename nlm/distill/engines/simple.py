"""The simple engine: the student's full logits of the target rows at once, the objective's row terms on them.

Used for models that post-process logits after the head (soft-capping, scaling), for FSDP version 1, for
objectives with a term the fused engine cannot chunk, and on request (`loss_impl: simple`)."""

from __future__ import annotations

from typing import Any

import torch

from nlm.distill.engines.base import EngineContext, EngineStep, student_forward, target_rows, with_batch_terms
from nlm.distill.loss import combine_terms
from nlm.distill.objective import Objective
from nlm.distill.teacher import Teacher


class SimpleEngine:
    name = "simple"

    def __init__(self, context: EngineContext) -> None:
        self.context = context

    def step(self, model: Any, inputs: dict[str, torch.Tensor], objective: Objective, teacher: Teacher | None,
             normalizer: Any) -> EngineStep:
        mask, targets = target_rows(inputs)
        width = self.context.vocab_width
        student_layers, teacher_layers = objective.hidden_layers()
        use_teacher = teacher is not None and "teacher" in objective.needs
        outputs = model(**student_forward(inputs, bool(student_layers)))
        student = outputs.logits[:, :-1, :width][mask]  # [n, V]
        signal = (teacher.signal(inputs, mask, student.device, layers=teacher_layers, full_logits=True)
                  if use_teacher else None)
        sums = objective.row_sums(student.float(), signal.all_rows() if signal is not None else None, targets)
        parts = combine_terms(objective, sums, targets.numel(), normalizer)
        parts = with_batch_terms(objective, parts, outputs, mask, student_layers, signal, normalizer)
        return EngineStep(parts, outputs, lambda start, end: student[start:end].detach())
