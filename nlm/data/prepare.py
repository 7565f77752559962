"""From a TrainingConfig to tokenised train and eval datasets: file resolution, tokenisation, eval split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from nlm.config.settings import TrainingConfig
from nlm.data.files import resolve_eval_files, resolve_train_files
from nlm.data.mixture import Source, concatenate, load_sources
from nlm.data.tokenize import TokenizedData, TokenizeSettings, tokenize_records

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    train_data: TokenizedData
    eval_data: TokenizedData | None
    # Set when a mixture or a curriculum decides the order: the sources, each with its key columns.
    sources: list[Source] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Hashes, counts and skips, for the run's metadata."""
        out: dict[str, Any] = {"train_files": self.train_data.files, "train_examples": len(self.train),
                               "train_stats": vars(self.train_data.stats)}
        if self.sources:
            out["train_files"] = {k: v for source in self.sources for k, v in source.data.files.items()}
            out["sources"] = [source.summary() for source in self.sources]
        if self.eval is not None:
            out["eval_examples"] = len(self.eval)
        if self.eval_data is not None:
            out["eval_files"] = self.eval_data.files
            out["eval_stats"] = vars(self.eval_data.stats)
        return out


def tokenize_settings(config: TrainingConfig) -> TokenizeSettings:
    return TokenizeSettings(
        max_seq_length=config.max_seq_length,
        completion_only_loss=config.completion_only_loss,
        prompt_separator=config.prompt_separator,
        max_line_bytes=config.max_line_bytes,
        route_teachers=config.route_teachers,
    )


def prepare_datasets(config: TrainingConfig, tokenizer: Any, cache_root: Path | None, with_index: bool = False,
                     teacher_tokenizer: Any = None) -> PreparedData:
    """Tokenise the training data and the evaluation data (a file, a SageMaker channel, or a held-out split).

    `with_index` adds each training example's position in the tokenised files (before any eval split):
    the key into a teacher cache. `teacher_tokenizer` (a teacher with its own tokenizer) adds the teacher's
    tokenisation and the alignment of each example.
    """
    settings = tokenize_settings(config)
    if config.train_mixture or config.curriculum.by:
        return _prepare_sources(config, tokenizer, settings, cache_root, with_index, teacher_tokenizer)
    train_data = tokenize_records(resolve_train_files(config.train_file), tokenizer, settings, cache_root,
                                  teacher_tokenizer=teacher_tokenizer)
    train, evaluation, eval_data = train_data.dataset, None, None
    if with_index:
        train = train.add_column("index", list(range(len(train))))
    eval_files = resolve_eval_files(config.eval_file)
    if eval_files:
        eval_data = tokenize_records(eval_files, tokenizer, settings, cache_root, teacher_tokenizer=teacher_tokenizer)
        evaluation = eval_data.dataset
    elif config.eval_split > 0:
        if len(train) < 2:
            logger.warning("eval_split ignored: only %d training example", len(train))
        else:
            split = train.train_test_split(test_size=config.eval_split, seed=config.seed, shuffle=True)
            train, evaluation = split["train"], split["test"]
            logger.info("held out %d of %d examples for eval (seed %d)", len(evaluation), len(train_data.dataset), config.seed)
    return PreparedData(train=train, eval=evaluation, train_data=train_data, eval_data=eval_data)


def _prepare_sources(config: TrainingConfig, tokenizer: Any, settings: TokenizeSettings, cache_root: Path | None,
                     with_index: bool = False, teacher_tokenizer: Any = None) -> PreparedData:
    """Mixture or curriculum: tokenise each source apart, keep its key columns, hold out eval per source."""
    eval_files = resolve_eval_files(config.eval_file)
    sources = load_sources(config, tokenizer, settings, cache_root, eval_split=0.0 if eval_files else config.eval_split,
                           with_index=with_index, teacher_tokenizer=teacher_tokenizer)
    train = concatenate([source.dataset for source in sources])
    evaluation, eval_data = None, None
    if eval_files:
        eval_data = tokenize_records(eval_files, tokenizer, settings, cache_root, teacher_tokenizer=teacher_tokenizer)
        evaluation = eval_data.dataset
    elif any(source.eval is not None for source in sources):
        evaluation = concatenate([source.eval for source in sources if source.eval is not None])
        logger.info("held out %d examples for eval (%s of each source, seed %d)", len(evaluation), config.eval_split, config.seed)
    return PreparedData(train=train, eval=evaluation, train_data=sources[0].data, eval_data=eval_data, sources=sources)
