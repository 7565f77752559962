"""Distil a teacher into a student.

Every training option (see below, or docs/CONFIGURATION.md) is a flag, an NLM_* environment variable or a key
of the YAML file given with --config. Precedence: flag > environment > YAML > default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="YAML file of training options")
    training_args: list[str] = Field(default_factory=list, json_schema_extra={"training_flags": True})


def run(options: Options) -> int:
    from nlm.config.logging_setup import current_log_format, is_main_process
    from nlm.config.sources import load_config

    config = load_config(options.training_args, options.config).config  # usage errors before heavy imports
    from nlm.apps.train import train

    result = train(config, log_format=current_log_format())
    if is_main_process():  # one line per run, not one per process under torchrun
        print(f"final model: {result.final_dir}")
    return 0
