"""The training options in groups: `nlm config show` output, `--help` epilogs and docs/CONFIGURATION.md.

Grouping is presentation only: every flag, `NLM_…` variable and YAML key keeps its flat (or dotted) name.
A field missing from GROUPS is shown under "other"; a nested model (`lora`, `distillation`, ...) is its own group.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from nlm.config.settings import TrainingConfig
from nlm.config.sources import LoadedConfig, known_keys

GROUPS: dict[str, tuple[str, ...]] = {
    "models": ("teacher_model", "student_model", "teacher_revision", "student_revision", "hf_token",
               "trust_remote_code"),
    "data": ("train_file", "eval_file", "eval_split", "max_seq_length", "completion_only_loss", "prompt_separator",
             "max_line_bytes"),
    "output": ("output_dir", "run_name", "overwrite", "resume", "merge_lora"),
    "optimisation": ("num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                     "weight_decay", "max_grad_norm", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "auto_find_batch_size", "gradient_checkpointing", "seed",
                     "max_bad_steps"),
    "loss engine and teacher cache": ("loss_impl", "loss_chunk_tokens", "teacher_cache"),
    "served teacher": ("teacher_url", "teacher_served_model", "teacher_api_key", "teacher_top_k", "teacher_concurrency",
                       "teacher_timeout", "teacher_retries", "teacher_prefetch_batches"),
    "devices and precision": ("device_preference", "device", "precision", "teacher_device", "teacher_precision"),
    "evaluation, checkpoints and logging": ("eval_strategy", "eval_steps", "save_strategy", "save_steps",
                                            "save_total_limit", "load_best_model_at_end", "logging_steps",
                                            "report_to"),
}


def grouped_fields(model: type[BaseModel] = TrainingConfig) -> dict[str, list[str]]:
    """Group title -> top-level field names, in display order; nested models last, each its own group."""
    fields = model.model_fields
    nested = [n for n, f in fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    groups: dict[str, list[str]] = {title: [n for n in names if n in fields] for title, names in GROUPS.items()}
    listed = {n for names in groups.values() for n in names}
    other = [n for n in fields if n not in listed and n not in nested]
    if other:
        groups["other"] = other
    for name in nested:
        groups[name] = [name]
    return {title: names for title, names in groups.items() if names}


def format_config(loaded: LoadedConfig, sources: bool = False) -> str:
    """The effective configuration as YAML (loadable again with --config), one commented block per group."""
    document = loaded.config.model_dump(mode="json")
    blocks = []
    for title, names in grouped_fields().items():
        part = {name: document[name] for name in names}
        blocks.append(f"# {title}\n" + yaml.safe_dump(part, sort_keys=False, allow_unicode=True).rstrip())
    text = "\n\n".join(blocks)
    if sources:
        width = max(len(k) for k in loaded.sources)
        text += "\n\n# sources\n" + "\n".join(f"# {key:<{width}}  {source}" for key, source in loaded.sources.items())
    return text


def grouped_keys() -> dict[str, dict[str, Any]]:
    """Group title -> {dotted option name: field info}, for help and the reference."""
    keys = known_keys()
    out: dict[str, dict[str, Any]] = {}
    for title, names in grouped_fields().items():
        out[title] = {k: f for k, f in keys.items() if k.split(".")[0] in names}
    return out


def options_help() -> str:
    """Every training option by group, for the --help of the commands that take them."""
    lines = ["configuration options (CLI > NLM_* environment > --config YAML > default):"]
    for title, keys in grouped_keys().items():
        lines.append(f"\n {title}:")
        for key, field in keys.items():
            default = field.get_default(call_default_factory=True)
            shown = repr(default) if isinstance(default, str) else default
            lines.append(f"  --{key:<32} {field.description or ''} [default: {shown}]")
    return "\n".join(lines)
