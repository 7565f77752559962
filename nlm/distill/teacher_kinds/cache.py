"""`teacher_cache: DIR`: targets read from an offline cache; no teacher model is loaded. A top-k cache gives a
`CachedTeacher`; a `cross_alm` cache (a teacher with another tokenizer) a `CachedAlignedTeacher`."""

from __future__ import annotations

import logging
from typing import Any

from nlm.config.settings import TrainingConfig
from nlm.distill.cache import CacheMismatchError, TeacherCache, cache_fingerprint, compare_fingerprints
from nlm.distill.cross_cache import KIND, cross_fingerprint, open_cross_cache
from nlm.distill.teacher import CachedTeacher, Teacher
from nlm.errors import ConfigError

logger = logging.getLogger(__name__)


def selects(config: TrainingConfig) -> bool:
    return bool(config.teacher_cache)


def load(config: TrainingConfig, context: Any) -> Teacher:
    return open_teacher_cache(config, context.tokenizer)


def open_teacher_cache(config: TrainingConfig, tokenizer: Any) -> Teacher:
    """The cache named by `teacher_cache`, checked against this run's data, tokenizer and settings."""
    try:
        cache = TeacherCache(config.teacher_cache)
        if cache.manifest.get("kind") == KIND:  # a teacher with another tokenizer: group likelihoods
            teacher = open_cross_cache(cache, tokenizer, config.distillation.cross_tokenizer)
            expected = {**cache_fingerprint(config, teacher.paired_tokenizer, 0), **cross_fingerprint(tokenizer)}
            compare_fingerprints(expected, cache.fingerprint, cache.directory)
            logger.info("cross-tokenizer (alm) teacher from cache %s (%d aligned groups); the teacher model is not loaded",
                        cache.directory, cache.manifest["tokens"])
            return teacher
        compare_fingerprints(cache_fingerprint(config, tokenizer, cache.top_k, cache.tail_samples), cache.fingerprint,
                             cache.directory)
    except (FileNotFoundError, CacheMismatchError) as exc:
        raise ConfigError(str(exc)) from None
    if cache.tail_samples and config.distillation.divergence != "forward_kl":
        # The draws estimate p without bias, and forward KL's gradient (q - p) is linear in p; the other
        # divergences are not, so their estimate from the draws would be biased.
        raise ConfigError(f"teacher cache {cache.directory} samples its tail (tail_samples {cache.tail_samples}), an unbiased "
                          f"target for distillation.divergence forward_kl only, not {config.distillation.divergence}: use "
                          "forward_kl, or a cache built without --tail_samples")
    if cache.vocab_size != len(tokenizer):
        raise ConfigError(f"teacher cache vocabulary {cache.vocab_size} differs from the student tokenizer's {len(tokenizer)}")
    shape = (f"top-{cache.top_k - cache.tail_samples} + {cache.tail_samples} tail draws" if cache.tail_samples
             else f"top-{cache.top_k}")
    logger.info("teacher targets from cache %s (%s, %d tokens); the teacher model is not loaded",
                cache.directory, shape, cache.manifest["tokens"])
    return CachedTeacher(cache)
