"""From the configuration to a `Teacher`: the one place a run's teacher is built, selected by its kind.

Each kind is a module of `nlm.distill.teacher_kinds` with two functions:

    selects(config) -> bool                    does this configuration ask for this kind?
    load(config, context) -> Teacher | None    build it (None: not this kind after all, try the next)

and one line in `TEACHER_KINDS` below; the first kind whose `selects` is true builds the run's teacher. The
user-facing keys stay as they are (`teacher_cache`, `teachers`, `teacher_model` + `distillation.cross_tokenizer`):
the kind is derived from them, in the table's order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from nlm.config.settings import TeacherSpec, TrainingConfig
from nlm.distill.teacher import Teacher
from nlm.models.device import PrecisionPlan

# kind -> module (selects/load). Order is precedence: a cache wins over a model named next to it.
TEACHER_KINDS: dict[str, str] = {
    "cache": "nlm.distill.teacher_kinds.cache",  # teacher_cache: top-k targets, or cross_alm group likelihoods
    "served": "nlm.distill.teacher_kinds.served",  # teacher_url: a teacher behind an OpenAI-compatible server
    "cross_tokenizer": "nlm.distill.teacher_kinds.cross_tokenizer",  # teacher_model + distillation.cross_tokenizer
    "ensemble": "nlm.distill.teacher_kinds.ensemble",  # teachers: [...]
    "live": "nlm.distill.teacher_kinds.live",  # teacher_model
}


@dataclass
class TeacherContext:
    """What building a teacher needs besides the configuration."""

    tokenizer: Any  # the student's tokenizer
    student: Any | None  # the student model (None: only the tokenizer is compared, as when building a cache)
    device: torch.device  # the run's device (a teacher goes to `teacher_device` when set)
    precision: PrecisionPlan


def teacher_specs(config: TrainingConfig) -> list[TeacherSpec]:
    """Every configured teacher; `teacher_model` is the one-teacher shorthand."""
    if config.teachers:
        return list(config.teachers)
    if config.teacher_model:
        return [TeacherSpec(model=config.teacher_model, revision=config.teacher_revision, device=config.teacher_device)]
    return []


def kind_module(kind: str) -> ModuleType:
    return importlib.import_module(TEACHER_KINDS[kind])


def teacher_kinds(config: TrainingConfig) -> list[str]:
    """The kinds this configuration selects, in precedence order (the first that builds one wins)."""
    return [kind for kind in TEACHER_KINDS if kind_module(kind).selects(config)]


def load_teacher(config: TrainingConfig, tokenizer: Any, student: Any | None, device: torch.device,
                 precision: PrecisionPlan) -> Teacher | None:
    """The run's teacher (see the module docstring), or None: plain fine-tuning."""
    context = TeacherContext(tokenizer, student, device, precision)
    for kind in teacher_kinds(config):
        teacher = kind_module(kind).load(config, context)
        if teacher is not None:
            return teacher
    return None
