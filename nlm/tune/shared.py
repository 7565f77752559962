"""Work every trial would repeat, done once before the study: tokenised data and, when the space allows it,
one teacher cache.

Tokenised data: the trials write under DIR/trials/, and a run looks for its tokenised data in
output_dir/.cache/tokenized/ first (keyed by data content, tokenizer and settings), so tokenising the run's
data there once serves every trial whose tokenisation options are not searched.

Teacher cache: one `nlm teacher-cache` for all trials when every point of the space trains from the same
cache. A cache cannot serve a trial that needs the live teacher — on-policy or sequence-level steps
(`lmbda` > 0, `seq_kd`: the teacher scores or writes new text), an adaptive temperature (`temperature_mode`
entropy/learned: the whole distribution) or the hidden-state term (the teacher's hidden states) — nor a
point whose cache fingerprint differs from the run's (`cache_fingerprint`: temperature, data files,
tokenisation settings, teacher). Every bound and choice of the space is checked against both rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from nlm.config.paths import path_inside
from nlm.training.launch import child_environment, run_logged

logger = logging.getLogger("nlm.tune")

TEACHER_KEYS = ("teacher_model", "teacher_revision", "teachers")


def tokenize_once(config: Any, trials_dir: Path) -> None:
    """Tokenise the run's train/eval data into the cache the trials read (DIR/trials/.cache/tokenized)."""
    from nlm.data.prepare import prepare_datasets
    from nlm.models.loading import hub_options, load_tokenizer

    tokenizer = load_tokenizer(config.student_model, **hub_options(config, config.student_revision))
    prepare_datasets(config, tokenizer, cache_root=path_inside(trials_dir, ".cache/tokenized"))


def needs_live_teacher(config: Any) -> str | None:
    """Why a run with `config` cannot train from a teacher cache, or None when it can."""
    distillation = config.distillation
    if distillation.lmbda > 0:
        return "distillation.lmbda > 0 (the teacher scores the student's samples)"
    if distillation.seq_kd:
        return "distillation.seq_kd (the teacher generates)"
    if distillation.temperature_mode != "fixed":
        return f"distillation.temperature_mode={distillation.temperature_mode} (needs the whole distribution)"
    if distillation.hidden_states.weight > 0:
        return "distillation.hidden_states (needs the teacher's hidden states)"
    return None


def cache_plan(setup: Any) -> str | None:
    """None when one teacher cache can serve every trial; else the reason the trials run the live teacher."""
    from nlm.config.settings import TrainingConfig
    from nlm.tune.spec import merged

    base = setup.config
    if setup.spec.teacher_cache == "off":
        return "tune.teacher_cache: off"
    if not base.teacher_model:
        return "no teacher_model" if not base.teachers else "several teachers"
    if base.distillation.cross_tokenizer:
        return "a cross-tokenizer teacher"
    document = merged(setup.document, setup.spec.budget)
    base_fingerprint = _data_fingerprint(base)
    for dimension in setup.dimensions:
        if dimension.key in TEACHER_KEYS:
            return f"the space searches {dimension.key}"
        for value in dimension.candidates():
            config = TrainingConfig.model_validate(merged(document, {dimension.key: value}))
            reason = needs_live_teacher(config)
            if reason is not None:
                return f"{dimension.key} = {value!r}: {reason}"
            if config.distillation.alpha > 0 and _data_fingerprint(config) != base_fingerprint:
                return f"{dimension.key} = {value!r} changes the teacher cache's fingerprint"
    return needs_live_teacher(base)


def _data_fingerprint(config: Any) -> str:
    """`cache_fingerprint` without the teacher's weights (the teacher keys are not searched: same weights)."""
    from nlm.distill.cache import cache_fingerprint
    from nlm.models.loading import hub_options, load_tokenizer

    tokenizer = load_tokenizer(config.teacher_model, **hub_options(config, config.teacher_revision))
    fingerprint = cache_fingerprint(config.model_copy(update={"teacher_model": None}), tokenizer, 0)
    return json.dumps(fingerprint, sort_keys=True, default=str)


def build_teacher_cache(setup: Any, root: Path, top_k: int) -> Path | None:
    """One `nlm teacher-cache` child for all trials (a complete cache from an earlier run is reused).
    None when it failed: the trials then run the live teacher."""
    import sys

    from nlm.tune.spec import merged

    document = merged(setup.document, setup.spec.budget)
    document.update(output_dir=str(root / "trials"), run_name="teacher-cache")
    digest = hashlib.sha256(_data_fingerprint(setup.config).encode()).hexdigest()[:16]
    directory = path_inside(root / "trials", f".cache/teacher/{digest}-top{top_k}")
    config_path = root / ".tune" / "teacher_cache.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    log_path = root / ".tune" / "logs" / "teacher-cache.log"
    command = [sys.executable, "-m", "nlm.cli", "teacher-cache", "--config", str(config_path), "--output", str(directory),
               "--top_k", str(top_k), "--overwrite=false"]
    returncode, error = run_logged(command, child_environment(), log_path)
    if returncode != 0:
        logger.warning("the shared teacher cache failed (%s); the trials run the live teacher (log: %s)", error, log_path)
        return None
    logger.info("shared teacher cache: %s", directory)
    return directory
