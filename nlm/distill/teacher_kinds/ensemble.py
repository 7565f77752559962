"""`teachers: [...]`: several live teachers sharing the student's tokenizer (`EnsembleTeacher`)."""

from __future__ import annotations

from typing import Any

from nlm.config.settings import TrainingConfig
from nlm.distill.teacher import EnsembleTeacher
from nlm.distill.teacher_kinds.live import load_live_teacher
from nlm.errors import ConfigError


def selects(config: TrainingConfig) -> bool:
    return bool(config.teachers)


def load(config: TrainingConfig, context: Any) -> EnsembleTeacher:
    specs = list(config.teachers)
    members = [load_live_teacher(config, spec, context.tokenizer, context.student, context.device, context.precision)
               for spec in specs]
    widths = {member.vocab_width for member in members}
    if len(widths) != 1:
        raise ConfigError(f"teachers compare over different vocabulary widths {sorted(widths)}; they must share the student's tokenizer")
    try:
        return EnsembleTeacher(members, [spec.weight for spec in specs], config.distillation.teacher_mixture,
                               names=[spec.route_name for spec in specs])
    except ValueError as exc:
        raise ConfigError(f"teachers: {exc}") from None
