"""Run the teacher once over the training data and store its top-k targets (or, for a teacher with another
tokenizer and distillation.cross_tokenizer=alm, one likelihood per aligned group).

Takes the training options too (--config, --train_file, --max_seq_length ...): the cache must be built with
the settings the training run will use.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="the YAML file the training run will use")
    teacher: str | None = Field(None, description="teacher model (same as --teacher_model)")
    output: str = Field(description="cache folder")
    top_k: int = Field(64, ge=1, description="teacher tokens kept per position")
    tail_samples: int = Field(0, ge=0, description="of the top_k slots, how many are draws from the teacher's tail "
                              "(an unbiased estimate of the rest of the distribution, for forward_kl; 0: the top_k tokens)")
    batch_size: int = Field(8, ge=1, description="sequences per teacher forward")
    shard_examples: int = Field(1024, ge=1, description="examples per shard (resume unit)")
    training_args: list[str] = Field(default_factory=list, json_schema_extra={"training_flags": True})

    _output_is_safe = field_validator("output")(staticmethod(output_path_check))


def run(options: Options) -> int:
    from pathlib import Path

    from nlm.config.sources import load_config

    args = [*options.training_args, *(["--teacher_model", options.teacher] if options.teacher else [])]
    config = load_config(args, options.config).config  # usage errors before heavy imports
    from nlm.apps.teacher_cache import build_teacher_cache

    manifest = build_teacher_cache(config, Path(options.output), top_k=options.top_k, batch_size=options.batch_size,
                                   shard_examples=options.shard_examples, overwrite=config.overwrite,
                                   tail_samples=options.tail_samples)
    unit = "aligned groups" if manifest.get("kind") == "cross_alm" else "tokens"
    print(f"teacher cache: {options.output} ({manifest['tokens']} {unit}, {manifest['bytes_per_token']} bytes per "
          f"{unit.split()[-1].rstrip('s')})")
    return 0
