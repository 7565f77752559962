"""From a TrainingConfig to tokenised train and eval datasets: file resolution, tokenisation, eval split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from nlm.config.settings import TrainingConfig
from nlm.data.files import resolve_eval_files, resolve_train_files
from nlm.data.tokenize import TokenizedData, TokenizeSettings, tokenize_records

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    train_data: TokenizedData
    eval_data: TokenizedData | None

    def summary(self) -> dict[str, Any]:
        """Hashes, counts and skips, for the run's metadata."""
        out: dict[str, Any] = {"train_files": self.train_data.files, "train_examples": len(self.train),
                               "train_stats": vars(self.train_data.stats)}
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


def prepare_datasets(config: TrainingConfig, tokenizer: Any, cache_root: Path | None, with_index: bool = False) -> PreparedData:
    """Tokenise the training data and the evaluation data (a file, a SageMaker channel, or a held-out split).

    `with_index` adds each training example's position in the tokenised files (before any eval split):
    the key into a teacher cache.
    """
    settings = tokenize_settings(config)
    train_data = tokenize_records(resolve_train_files(config.train_file), tokenizer, settings, cache_root)
    train, evaluation, eval_data = train_data.dataset, None, None
    if with_index:
        train = train.add_column("index", list(range(len(train))))
    eval_files = resolve_eval_files(config.eval_file)
    if eval_files:
        eval_data = tokenize_records(eval_files, tokenizer, settings, cache_root)
        evaluation = eval_data.dataset
    elif config.eval_split > 0:
        if len(train) < 2:
            logger.warning("eval_split ignored: only %d training example", len(train))
        else:
            split = train.train_test_split(test_size=config.eval_split, seed=config.seed, shuffle=True)
            train, evaluation = split["train"], split["test"]
            logger.info("held out %d of %d examples for eval (seed %d)", len(evaluation), len(train_data.dataset), config.seed)
    return PreparedData(train=train, eval=evaluation, train_data=train_data, eval_data=eval_data)
