"""From the configuration to a `Teacher`: the cache, one live model, or several (`teachers:`)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from nlm.config.settings import TeacherSpec, TrainingConfig
from nlm.distill.cache import CacheMismatchError, TeacherCache, compare_fingerprints
from nlm.distill.teacher import CachedTeacher, EnsembleTeacher, LiveTeacher, Teacher
from nlm.errors import ConfigError
from nlm.models.device import PrecisionPlan, select_device, teacher_dtype
from nlm.models.loading import load_causal_lm, load_tokenizer, model_revision
from nlm.models.vocab import shared_vocab_width

logger = logging.getLogger(__name__)


def teacher_specs(config: TrainingConfig) -> list[TeacherSpec]:
    """Every configured teacher; `teacher_model` is the one-teacher shorthand."""
    if config.teachers:
        return list(config.teachers)
    if config.teacher_model:
        return [TeacherSpec(model=config.teacher_model, revision=config.teacher_revision, device=config.teacher_device)]
    return []


def _hub(config: TrainingConfig, revision: str | None) -> dict[str, Any]:
    return {"revision": revision, "token": config.hf_token, "trust_remote_code": config.trust_remote_code}


def load_live_teacher(config: TrainingConfig, spec: TeacherSpec, tokenizer: Any, student: Any | None, device: torch.device,
                      precision: PrecisionPlan) -> LiveTeacher:
    """One frozen teacher on its device, checked to share the student's tokenizer (`student` None: only the
    tokenizer is compared, as when building a cache)."""
    device_name = spec.device or config.teacher_device
    teacher_device = torch.device(device_name) if device_name else device
    if device_name:
        select_device(forced=device_name)  # a clear error when that device does not exist
    model = load_causal_lm(spec.model, dtype=teacher_dtype(config.teacher_precision, precision, teacher_device),
                           **_hub(config, spec.revision))
    vocab_width = shared_vocab_width(load_tokenizer(spec.model, **_hub(config, spec.revision)), tokenizer, model,
                                     student if student is not None else model)
    return LiveTeacher(model, teacher_device, vocab_width, name=spec.model, revision=model_revision(model) or spec.revision)


def load_teacher(config: TrainingConfig, tokenizer: Any, student: Any | None, device: torch.device,
                 precision: PrecisionPlan) -> Teacher | None:
    """The run's teacher: its cache, one live model, an ensemble of several, or None (plain fine-tuning)."""
    if config.teacher_cache:
        return open_teacher_cache(config, tokenizer)
    if config.teacher_url:  # issue 30: the teacher behind an OpenAI-compatible server
        from nlm.distill.served_teacher import load_served_teacher

        return load_served_teacher(config, tokenizer)
    specs = teacher_specs(config)
    if not specs:
        return None
    if not config.teachers:
        return load_live_teacher(config, specs[0], tokenizer, student, device, precision)
    members = [load_live_teacher(config, spec, tokenizer, student, device, precision) for spec in specs]
    widths = {member.vocab_width for member in members}
    if len(widths) != 1:
        raise ConfigError(f"teachers compare over different vocabulary widths {sorted(widths)}; they must share the student's tokenizer")
    try:
        return EnsembleTeacher(members, [spec.weight for spec in specs], config.distillation.teacher_mixture,
                               names=[spec.route_name for spec in specs])
    except ValueError as exc:
        raise ConfigError(f"teachers: {exc}") from None


def open_teacher_cache(config: TrainingConfig, tokenizer: Any) -> Teacher:
    """The cache named by `teacher_cache`, checked against this run's data, tokenizer and settings."""
    from nlm.distill.cache_builder import cache_fingerprint
    from nlm.distill.cross_cache import KIND, cross_fingerprint, open_cross_cache

    try:
        cache = TeacherCache(config.teacher_cache)
        if cache.manifest.get("kind") == KIND:  # a teacher with another tokenizer: group likelihoods
            teacher = open_cross_cache(cache, tokenizer, config.distillation.cross_tokenizer)
            expected = {**cache_fingerprint(config, teacher.paired_tokenizer, 0), **cross_fingerprint(tokenizer)}
            compare_fingerprints(expected, cache.fingerprint, cache.directory)
            logger.info("cross-tokenizer (alm) teacher from cache %s (%d aligned groups); the teacher model is not loaded",
                        cache.directory, cache.manifest["tokens"])
            return teacher
        compare_fingerprints(cache_fingerprint(config, tokenizer, cache.top_k), cache.fingerprint, cache.directory)
    except (FileNotFoundError, CacheMismatchError) as exc:
        raise ConfigError(str(exc)) from None
    if cache.vocab_size != len(tokenizer):
        raise ConfigError(f"teacher cache vocabulary {cache.vocab_size} differs from the student tokenizer's {len(tokenizer)}")
    logger.info("teacher targets from cache %s (top-%d, %d tokens); the teacher model is not loaded",
                cache.directory, cache.top_k, cache.manifest["tokens"])
    return CachedTeacher(cache)
