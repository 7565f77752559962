"""Write the training order of one epoch (mixture and curriculum applied) as JSONL, to inspect it.

Reads the training config (train_mixture or train_file, curriculum, seed, batch sizes) and writes every
record of epoch N verbatim, in the exact order `nlm train` will use, with `_source` (the source's name)
and `_line` (its line in that source's file) added. Prints the examples drawn from each source.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    """Flags of `nlm data mix`."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(description="training config (YAML) with train_mixture or train_file, and any curriculum")
    output: str = Field(description="JSONL file to write (ORDER.jsonl)")
    epoch: int = Field(0, ge=0, description="which epoch's order to write (0 = the first)")
    overwrite: bool = Field(False, description="replace the output file if an earlier nlm command wrote it")

    _output_is_safe = field_validator("output")(staticmethod(output_path_check))


def run(options: Options) -> int:
    """Load the config and the student's tokenizer, build the order as `nlm train` does, write it."""
    import os
    from pathlib import Path

    from nlm.config.paths import claim_file, path_inside, record_file
    from nlm.config.sources import load_config
    from nlm.data.prepare import prepare_datasets
    from nlm.errors import ConfigError
    from nlm.models.loading import hub_options, load_tokenizer
    from nlm.training.order import build_order, write_order

    config = load_config([], Path(options.config)).config
    output = claim_file(options.output, overwrite=options.overwrite)
    if not config.student_model:
        raise ConfigError("student_model is required (its tokenizer decides which records become examples)")
    hub = hub_options(config, config.student_revision)
    tokenizer = load_tokenizer(config.student_model, **hub)
    data = prepare_datasets(config, tokenizer, cache_root=path_inside(config.output_dir, ".cache/tokenized"))
    scorer = _scorer(config, tokenizer) if config.curriculum.by in ("teacher_loss", "student_loss") else None
    plan = build_order(config, data, int(os.environ.get("WORLD_SIZE", "1")), scorer)
    if plan is None:
        raise ConfigError(f"{options.config}: neither train_mixture nor curriculum is set, so the order is the trainer's own shuffle")
    counts = write_order(config, data, plan, output, options.epoch)
    record_file(output, "nlm data mix")
    print(f"{options.output}: epoch {options.epoch}, {sum(counts.values())} examples")
    for name, count in counts.items():
        print(f"  {name}: {count}")
    return 0


def _scorer(config, tokenizer):  # type: ignore[no-untyped-def]
    """Load the model the curriculum is scored by (scores are cached, so `nlm train` reuses them)."""
    import torch

    from nlm.config.paths import path_inside
    from nlm.models.device import select_device
    from nlm.models.loading import hub_options, load_causal_lm
    from nlm.training.order import model_scorer

    role = config.curriculum.by.split("_")[0]
    name, revision = getattr(config, f"{role}_model"), getattr(config, f"{role}_revision")
    device = select_device(config.device_preference, config.device)
    model = load_causal_lm(name, dtype=torch.float32, **hub_options(config, revision)).to(device)
    return model_scorer({role: model}, {role: name}, len(tokenizer), tokenizer.pad_token_id or 0,
                        config.per_device_eval_batch_size, path_inside(config.output_dir, ".cache/tokenized"))
