"""`teacher_model`: one frozen causal LM sharing the student's tokenizer (`LiveTeacher`)."""

from __future__ import annotations

from typing import Any

import torch

from nlm.config.settings import TeacherSpec, TrainingConfig
from nlm.distill.teacher import LiveTeacher
from nlm.models.device import PrecisionPlan, select_device, teacher_dtype
from nlm.models.loading import hub_options, load_causal_lm, load_tokenizer, model_revision
from nlm.models.vocab import shared_vocab_width


def selects(config: TrainingConfig) -> bool:
    return bool(config.teacher_model)


def load(config: TrainingConfig, context: Any) -> LiveTeacher:
    return load_live_teacher(config, TeacherSpec(model=config.teacher_model, revision=config.teacher_revision,
                                                 device=config.teacher_device),
                             context.tokenizer, context.student, context.device, context.precision)


def teacher_device(config: TrainingConfig, device_name: str | None, device: torch.device) -> torch.device:
    """`device_name` (checked to exist) or the run's device."""
    if device_name:
        select_device(forced=device_name)  # a clear error when that device does not exist
        return torch.device(device_name)
    return device


def load_live_teacher(config: TrainingConfig, spec: TeacherSpec, tokenizer: Any, student: Any | None, device: torch.device,
                      precision: PrecisionPlan) -> LiveTeacher:
    """One frozen teacher on its device, checked to share the student's tokenizer (`student` None: only the
    tokenizer is compared, as when building a cache)."""
    on = teacher_device(config, spec.device or config.teacher_device, device)
    model = load_causal_lm(spec.model, dtype=teacher_dtype(config.teacher_precision, precision, on),
                           **hub_options(config, spec.revision))
    vocab_width = shared_vocab_width(load_tokenizer(spec.model, **hub_options(config, spec.revision)), tokenizer, model,
                                     student if student is not None else model)
    return LiveTeacher(model, on, vocab_width, name=spec.model, revision=model_revision(model) or spec.revision)
