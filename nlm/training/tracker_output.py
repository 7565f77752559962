"""Where the trackers of `report_to` write, by default inside the run (the loggers are transformers' own).

- TensorBoard: event files in `run_dir/tensorboard` (unless TENSORBOARD_LOGGING_DIR is set).
- MLflow: MLFLOW_TRACKING_URI, else a local sqlite store `output_dir/mlflow.db` (the file store is deprecated).
- W&B: project `nlm` (WANDB_PROJECT), files under the run (WANDB_DIR); WANDB_MODE=offline logs locally.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def default_mlflow_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def prepare_trackers(report_to: list[str], output_dir: Path, run_dir: Path) -> None:
    """Fill in the trackers' environment defaults (a value the user set is kept)."""
    if "mlflow" in report_to:
        uri = os.environ.setdefault("MLFLOW_TRACKING_URI", default_mlflow_uri(output_dir))
        logger.info("mlflow: tracking to %s", uri)
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_PROJECT", "nlm")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        logger.info("wandb: project %s, mode %s", os.environ["WANDB_PROJECT"], os.environ.get("WANDB_MODE", "online"))


def direct_tracker_output(trainer: Any, run_dir: Path) -> None:
    """Point TensorBoard's writer at run_dir/tensorboard (the library's default is a dated folder)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(run_dir / "tensorboard")
            logger.info("tensorboard: event files in %s", callback.logging_dir)
