"""`nlm config show`: the effective configuration as YAML, optionally with the source of every value."""

from __future__ import annotations

import yaml

from nlm.config.sources import LoadedConfig


def format_config(loaded: LoadedConfig, sources: bool = False) -> str:
    document = loaded.config.model_dump(mode="json")
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True).rstrip()
    if sources:
        width = max(len(k) for k in loaded.sources)
        text += "\n# sources\n" + "\n".join(f"# {key:<{width}}  {source}" for key, source in loaded.sources.items())
    return text


def options_help() -> str:
    """Every training option, for the --help of the commands that take them."""
    from nlm.config.sources import known_keys

    lines = ["configuration options (CLI > NLM_* environment > --config YAML > default):"]
    for key, field in known_keys().items():
        default = field.get_default(call_default_factory=True)
        shown = repr(default) if isinstance(default, str) else default
        lines.append(f"  --{key:<32} {field.description or ''} [default: {shown}]")
    return "\n".join(lines)
