"""Server settings: what `nlm serve` flags set. Limits here are the caps requests are validated against."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nlm.errors import ConfigError

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


def parse_model_specs(values: list[str], served_model_name: str | None = None) -> tuple[tuple[str, Path], ...]:
    """`--model` values -> (name, folder) pairs. `name=PATH` names a model; a bare PATH is named after its folder
    (or `--served_model_name` when it is the only model)."""
    specs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and _NAME.match(name) and not Path(value).exists():
            specs.append((name, Path(rest)))
        else:
            path = Path(value)
            default = served_model_name if served_model_name and len(values) == 1 else (path.name or "model")
            specs.append((default, path))
    names = [name for name, _ in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"--model: the name {duplicates[0]!r} is used twice; give each model its own name (--model NAME=PATH)")
    return tuple(specs)


@dataclass(frozen=True)
class ServerSettings:
    model: Path = SAGEMAKER_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str | None = None
    api_key: str | None = None  # the value, read from the environment variable named by --api_key_env
    max_batch_size: int = 32  # sequences decoded together (continuous batching: requests join and leave each step)
    batch_window_ms: float = 10.0  # when idle under concurrent traffic: how long the first arrival waits for company
    max_concurrent_requests: int = 64
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1024 * 1024
    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 64
    max_return_sequences: int = 4
    max_prompt_chars: int = 32_000
    max_prompt_tokens: int = 2048
    prompt_separator: str | None = None  # appended to /invocations prompts; None: the model's training separator
    device: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    graceful_shutdown_s: float = 30.0
    # Several models in one server (issue 17): (name, folder) pairs from repeated `--model NAME=PATH`.
    # Empty: the one model in `model`, named `model_name`. The first pair is the default model.
    models: tuple[tuple[str, Path], ...] = ()

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name or "model"

    @property
    def served_models(self) -> tuple[tuple[str, Path], ...]:
        """Every (name, folder) this server answers for, the default one first."""
        return self.models or ((self.model_name, self.model),)
