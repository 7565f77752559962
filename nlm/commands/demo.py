"""Distil a teacher into a student on a built-in task and compare with plain fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field("outputs/demo", description="folder for the demo's data, runs and report")
    # The names of nlm.demo.tasks.TASKS (a test keeps them equal); kept literal so --help needs no import.
    task: Literal["colours", "reverse"] = Field(
        "colours", description="built-in task: colours (noisy one-word labels) or reverse (multi-token answers, "
        "adds an on-policy student)")
    seed: int = Field(0, ge=0, description="seed of the task, the models and the runs")
    quick: bool = Field(False, description="fewer steps and smaller models (same code)")
    overwrite: bool = Field(False, description="replace an earlier demo in output_dir")
    data_only: bool = Field(False, description="only write the data set and tokenizer",
                            json_schema_extra={"aliases": ["--data-only"]})

    _output_is_safe = field_validator("output_dir")(staticmethod(output_path_check))


def run(options: Options) -> int:
    from pathlib import Path

    from nlm.config.logging_setup import current_log_format
    from nlm.demo.pipeline import run_demo

    run_demo(Path(options.output_dir), seed=options.seed, quick=options.quick, overwrite=options.overwrite,
             data_only=options.data_only, log_format=current_log_format(), task=options.task)
    return 0
