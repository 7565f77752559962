"""Render the training part of the configuration reference (docs/CONFIGURATION.md) from the settings classes.

The whole file, command options included, is written by `python -m nlm.commands.reference > docs/CONFIGURATION.md`
(running this module does the same); a test keeps the committed file in sync.
"""

from __future__ import annotations

from typing import Any

from nlm.config.settings import SECRET_FIELDS
from nlm.config.view import grouped_keys


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, str):
        return repr(value).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def _allowed(field: Any) -> str:
    parts = []
    for item in field.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            if getattr(item, name, None) is not None:
                parts.append(f"{symbol} {getattr(item, name)}")
    annotation = str(field.annotation).replace("typing.", "").replace("pathlib.", "").replace("|", "or")
    return ", ".join(parts) or annotation.replace("<class '", "").replace("'>", "")


def render_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `nlm/config/settings.py` and `nlm/commands/*.py` by `python -m nlm.commands.reference`; do not edit by hand.",
        "",
        "Every option can be given as a CLI flag (`--lora.r 32`), an environment variable (`NLM_LORA__R=32`;",
        "nested options use `__`), or a key in the YAML file passed with `--config` (`lora: {r: 32}`).",
        "Precedence, highest first: CLI > environment > YAML > default. Secrets (" + ", ".join(SECRET_FIELDS) + ") are",
        "accepted from the environment and the CLI only.",
        "",
        "## Training options",
        "",
        "Used by `nlm train`, `nlm teacher-cache` and `nlm config show`; grouped as `nlm config show` prints them.",
        "",
    ]
    for title, keys in grouped_keys().items():
        lines += [f"### {title}", "", "| option | environment | default | allowed | description |", "|---|---|---|---|---|"]
        for key, field in keys.items():
            env = "NLM_" + key.upper().replace(".", "__")
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | `{env}` | `{_default(field)}` | {_allowed(field)} | {description} |")
        lines.append("")
    return "\n".join(lines) + "\n"
