"""Render docs/CONFIGURATION.md: the training options, then every command's own options.

`python -m nlm.commands.reference > docs/CONFIGURATION.md`; a test keeps the committed file in sync.
"""

from __future__ import annotations

from nlm.commands import COMMANDS, command_summary, load_command
from nlm.commands.options import env_prefix, has_own_config_field, option_specs, reference_rows
from nlm.config.reference import render_reference as render_training_reference


def render_commands() -> str:
    lines = [
        "## Command options",
        "",
        "Each command's own options are flags, `NLM_<COMMAND>__<OPTION>` environment variables, and keys of the",
        "YAML file given with the command's `--config` (where the command has no training `--config` of its own).",
        "Precedence, highest first: flag > environment > YAML > default.",
        "Commands marked *training options* also take every option of the table above.",
    ]
    for name in COMMANDS:
        module = load_command(name)
        specs = option_specs(module.Options)
        notes = []
        if any(s.training_flags for s in specs):
            notes.append("*training options*")
        if not has_own_config_field(module.Options):
            notes.append(f"`--config FILE.yaml`, `{env_prefix(name)}*`")
        lines += ["", f"### `nlm {name}`", "", command_summary(module) + "." + (f" ({'; '.join(notes)})" if notes else "")]
        rows = reference_rows(name, module.Options)
        if rows:
            lines += ["", "| flag | environment | default | allowed | description |", "|---|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    return render_training_reference() + "\n" + render_commands()


if __name__ == "__main__":  # pragma: no cover
    print(render_reference(), end="")
