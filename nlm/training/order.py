"""The training order of a run: mixture weights, curriculum difficulty and seed -> an `OrderPlan`.

Wiring only: sources come from `nlm.data.mixture`, difficulty from `nlm.data.curriculum` (length, FIELD) or
from one scoring pass of a model (`nlm.distill.scoring`, cached next to the tokenised data), the order from
`nlm.data.sampler`. `nlm train` and `nlm data mix` both call `build_order`, so they agree by construction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nlm.config.settings import TrainingConfig
from nlm.data.curriculum import MODEL_SCORES, difficulty_ranking, field_values, target_lengths
from nlm.data.mixture import Source
from nlm.data.prepare import PreparedData
from nlm.data.sampler import OrderPlan, Pacing
from nlm.errors import ConfigError

logger = logging.getLogger(__name__)

# (by, source) -> one score per example of source.dataset
Scorer = Callable[[str, Source], np.ndarray]


def global_batch(config: TrainingConfig, world_size: int = 1) -> int:
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * max(world_size, 1)


def build_order(config: TrainingConfig, data: PreparedData, world_size: int = 1, scorer: Scorer | None = None) -> OrderPlan | None:
    """The plan of the run's order, or None when neither a mixture nor a curriculum is configured."""
    if not data.sources:
        return None
    ranking = None
    curriculum = config.curriculum
    if curriculum.by:
        ranking = [difficulty_ranking(difficulty_scores(curriculum.by, source, scorer), curriculum.order) for source in data.sources]
    plan = OrderPlan(
        sizes=[len(source.dataset) for source in data.sources],
        weights=[source.weight for source in data.sources],
        names=[source.name for source in data.sources],
        seed=config.seed,
        stopping=config.mixture_stopping,
        size=config.mixture_size,
        ranking=ranking,
        pacing=Pacing(curriculum.pacing, curriculum.start_fraction, curriculum.full_at),
    )
    length = plan.epoch_length()
    if config.max_steps > 0:
        plan.total_draws = config.max_steps * global_batch(config, world_size)
    else:
        plan.total_draws = int(math.ceil(config.num_train_epochs * length))
    logger.info("training order: %d examples per epoch from %s%s", length,
                ", ".join(f"{name} ({count})" for name, count in zip(plan.names, plan.quotas(length), strict=True)),
                f"; curriculum by {curriculum.by} ({curriculum.order}, {curriculum.pacing})" if curriculum.by else "")
    return plan


def difficulty_scores(by: str, source: Source, scorer: Scorer | None) -> np.ndarray:
    if by == "length":
        return target_lengths(source.dataset)
    if by in MODEL_SCORES:
        if scorer is None:
            raise ConfigError(f"curriculum.by = {by}: needs the {by.split('_')[0]} model, which this run does not load")
        return scorer(by, source)
    return field_values(source.files, list(zip(source.dataset["file"], source.dataset["line"], strict=True)), by)


def model_scorer(models: dict[str, Any], model_ids: dict[str, str | None], vocab_width: int, pad_token_id: int,
                 batch_size: int, cache_root: Path | None) -> Scorer:
    """A scorer for teacher_loss/student_loss from already loaded models; scores are cached under
    `cache_root/scores/`, keyed by the tokenised dataset's fingerprint and the model's identity."""
    from nlm.distill.scoring import score_examples

    def score(by: str, source: Source) -> np.ndarray:
        role = by.split("_")[0]
        model = models.get(role)
        if model is None:
            raise ConfigError(f"curriculum.by = {by}: needs {role}_model (a live {role}; a teacher cache has no per-example loss)")
        key = hashlib.sha256(json.dumps([by, _model_identity(model_ids.get(role)), source.dataset._fingerprint,
                                         len(source.dataset), vocab_width]).encode()).hexdigest()[:32]
        path = cache_root / "scores" / f"{key}.npy" if cache_root is not None else None
        if path is not None and path.is_file():
            logger.info("curriculum scores (%s, source %s) reused from %s", by, source.name, path)
            return np.load(path)
        logger.info("scoring %d examples of source %s by %s", len(source.dataset), source.name, by)
        values = score_examples(source.dataset, **{role: model}, vocab_width=vocab_width, pad_token_id=pad_token_id,
                                batch_size=batch_size)[by]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.stem + ".partial.npy")
            np.save(partial, values)
            os.replace(partial, path)
        return values

    return score


def _model_identity(model_id: str | None) -> list[Any]:
    """A model's name, plus the size and time of its weight files when it is a local folder."""
    if model_id is None:
        return [None]
    folder = Path(model_id)
    if not folder.is_dir():
        return [model_id]
    return [model_id, sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))]


def write_order(config: TrainingConfig, data: PreparedData, plan: OrderPlan, output: Path, epoch: int = 0) -> dict[str, int]:
    """Write epoch `epoch` of the training order to `output` as JSONL: each record verbatim from its file,
    plus `_source` (its source's name) and `_line` (its line in that file). Returns examples per source."""
    from nlm.data.mixture import record_reader

    readers = [record_reader(source.files) for source in data.sources]
    counts = dict.fromkeys(plan.names, 0)
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            for index in plan.epoch_order(epoch).tolist():
                s = plan.source_of(index)
                row = data.sources[s].dataset[index - int(plan.offsets[s])]
                record = readers[s](row["file"], row["line"])
                record = record if isinstance(record, dict) else {"value": record}
                handle.write(json.dumps({**record, "_source": plan.names[s], "_line": row["line"]}, ensure_ascii=False) + "\n")
                counts[plan.names[s]] += 1
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
        for read in readers:
            read.close()
    return counts
