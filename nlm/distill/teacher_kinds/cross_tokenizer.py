"""`teacher_model` + `distillation.cross_tokenizer`: a live teacher reading its own tokenisation
(`AlignedTeacher`); tokens are compared through text alignment (docs/CROSS_TOKENIZER.md). When the two
tokenizers turn out equal the option is ignored and the next kind (ensemble or live) builds the teacher."""

from __future__ import annotations

import logging
from typing import Any

import torch

from nlm.config.settings import TrainingConfig
from nlm.distill.aligned_teacher import AlignedTeacher
from nlm.distill.cross_vocab import build_vocab_map
from nlm.distill.engines.aligned import CrossSettings
from nlm.distill.teacher_kinds.live import teacher_device
from nlm.errors import ConfigError
from nlm.models.device import teacher_dtype
from nlm.models.loading import hub_options, load_causal_lm, load_tokenizer
from nlm.models.vocab import own_vocab_width, tokenizers_equal

logger = logging.getLogger(__name__)


def selects(config: TrainingConfig) -> bool:
    return bool(config.distillation.cross_tokenizer and config.teacher_model and not config.teacher_cache)


def load(config: TrainingConfig, context: Any) -> AlignedTeacher | None:
    teacher_tokenizer = load_tokenizer(config.teacher_model, **hub_options(config, config.teacher_revision))
    if tokenizers_equal(teacher_tokenizer, context.tokenizer):
        logger.info("distillation.cross_tokenizer=%s ignored: teacher and student share a tokenizer",
                    config.distillation.cross_tokenizer)
        return None
    on = teacher_device(config, config.teacher_device, context.device)
    model = load_causal_lm(config.teacher_model, dtype=teacher_dtype(config.teacher_precision, context.precision, on),
                           **hub_options(config, config.teacher_revision))
    return aligned_teacher(config, model, teacher_tokenizer, context.tokenizer, context.student, on)


def aligned_teacher(config: TrainingConfig, teacher_model: Any, teacher_tokenizer: Any, tokenizer: Any,
                    student: Any, device: torch.device) -> AlignedTeacher:
    """The teacher with its vocabulary map to the student's (tokens spelled by the same bytes)."""
    distillation = config.distillation
    teacher_width = own_vocab_width(teacher_tokenizer, teacher_model, "teacher")
    student_width = own_vocab_width(tokenizer, student, "student")
    vocab_map = build_vocab_map(teacher_tokenizer, tokenizer, teacher_width, student_width)
    for side in (teacher_tokenizer, tokenizer):
        if not getattr(side, "is_fast", False):
            raise ConfigError(f"distillation.cross_tokenizer needs fast tokenizers (offset mappings); "
                              f"{type(side).__name__} is not one")
    logger.info("cross-tokenizer distillation (%s): teacher vocabulary %d, student %d, %d tokens spelled alike",
                distillation.cross_tokenizer, teacher_width, student_width, vocab_map.matched)
    cross = CrossSettings(distillation.cross_tokenizer, distillation.hybrid_matched_weight, distillation.hybrid_unmatched_weight)
    return AlignedTeacher(teacher_model, device, teacher_width, teacher_tokenizer, cross, vocab_map)
