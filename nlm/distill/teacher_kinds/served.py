"""`teacher_url`: a teacher behind an OpenAI-compatible server (`nlm serve`, vLLM), asked for log-probabilities
over HTTP (`nlm.distill.served_teacher.ServedTeacher`); no teacher model is loaded in this process."""

from __future__ import annotations

from typing import Any

from nlm.config.settings import TrainingConfig
from nlm.distill.served_teacher import ServedTeacher, load_served_teacher


def selects(config: TrainingConfig) -> bool:
    return bool(config.teacher_url)


def load(config: TrainingConfig, context: Any) -> ServedTeacher:
    return load_served_teacher(config, context.tokenizer)
