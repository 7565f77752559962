"""Build a `TrainingConfig` from its sources and say where each value came from.

Precedence, highest first: CLI flags > `NLM_…` environment > YAML file (`--config`) > defaults.
pydantic-settings does the merging with its own CLI, environment and YAML sources; this module only
checks names before they reach it (so unknown keys get a "did you mean"), keeps secrets out of files,
and turns validation errors into one line that names the field, the value, its source and what is allowed.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    YamlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from nlm.config.settings import SECRET_FIELDS, TrainingConfig
from nlm.errors import ConfigError

_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("nlm_yaml_file", default=None)


class _FlowValues:
    """A complex value (a dict- or list-typed option) from the environment or a flag may be written as in the
    YAML file (`{0: 1, 1: 3}`), not only as JSON: the documented form works in every source."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)  # type: ignore[misc]
        except ValueError:
            try:
                parsed = yaml.safe_load(value) if isinstance(value, str) else None
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, dict | list):
                return parsed
            raise


class _EnvSource(_FlowValues, EnvSettingsSource):
    pass


class _CliSource(_FlowValues, CliSettingsSource):
    pass


class _LayeredTrainingConfig(TrainingConfig):
    """TrainingConfig whose file source is the YAML named by `--config` (set through a context variable)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, _EnvSource(settings_cls))
        yaml_file = _yaml_file.get()
        if yaml_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),)
        return sources


@dataclass(frozen=True)
class LoadedConfig:
    config: TrainingConfig
    sources: dict[str, str]  # dotted field name -> "cli" | "env" | "yaml" | "default"


def known_keys(model: type[BaseModel] = TrainingConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted names of every option (nested models included) mapped to their field info."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(known_keys(annotation, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field
    return keys


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _normalise_flags(cli_args: Sequence[str]) -> list[str]:
    """Reject unknown flags with a suggestion; accept `--flag true|false` for booleans too."""
    keys = known_keys()
    bool_keys = {k for k, f in keys.items() if f.annotation is bool}
    mapping_keys = {k for k, f in keys.items() if _holds_dict(f.annotation)}
    flag_names = list(keys) + [f"no-{k}" for k in bool_keys]
    args: list[str] = []
    i = 0
    while i < len(cli_args):
        arg = cli_args[i]
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            plain = name.replace("-", "_") if not name.startswith("no-") else name
            if plain not in keys and name not in flag_names:
                raise ConfigError(f"unknown option --{name}{_suggest(plain, list(keys))}")
            if plain in bool_keys:
                if not has_value and i + 1 < len(cli_args) and cli_args[i + 1].lower() in ("true", "false"):
                    has_value, value = True, cli_args[i + 1]
                    i += 1
                if has_value:
                    if value.lower() not in ("true", "false"):
                        raise ConfigError(f"--{name} = {value!r} (from command line): expected true or false")
                    arg = f"--{plain}" if value.lower() == "true" else f"--no-{plain}"
            elif plain in mapping_keys and (has_value or i + 1 < len(cli_args)):
                if not has_value:
                    value = cli_args[i + 1]
                    i += 1
                arg = f"--{plain}={_as_json_mapping(value)}"
            elif plain != name or has_value:
                arg = f"--{plain}" + (f"={value}" if has_value else "")
        elif arg.startswith("-") and not _is_number(arg):
            raise ConfigError(f"unknown option {arg}")
        args.append(arg)
        i += 1
    return args


def _holds_dict(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict or any(
        _holds_dict(arg) for arg in typing.get_args(annotation))


def _as_json_mapping(value: str) -> str:
    """`{0: 1, 1: 3}` as in the YAML file -> JSON for the CLI source (which reads JSON objects only)."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return json.dumps(parsed) if isinstance(parsed, dict) else value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a non-empty mapping of option: value (any command's `--config`)."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc})") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty (or only comments): expected a mapping of option: value")
    if not isinstance(data, dict):
        found = "a list" if isinstance(data, list) else type(data).__name__
        raise ConfigError(f"config file {path}: expected a mapping of option: value, found {found}")
    return data


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read and check a training YAML config: a mapping of known keys, and no secrets."""
    data = read_yaml_mapping(path)
    keys = known_keys()
    for dotted, value in _flatten(data, leaves=keys).items():
        if dotted in SECRET_FIELDS and value is not None:  # `hf_token: null` (as config show prints) is no secret
            raise ConfigError(
                f"config file {path}: '{dotted}' is a secret and must not be stored in a file; "
                f"set NLM_{dotted.upper()} in the environment or pass --{dotted}"
            )
        if dotted not in keys and not any(k.startswith(dotted + ".") for k in keys):
            raise ConfigError(f"config file {path}: unknown key '{dotted}'{_suggest(dotted, list(keys))}")
    return data


def _flatten(data: Mapping[str, Any], prefix: str = "", leaves: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dotted option names -> values. The walk stops at an option (`leaves`, every known one by default), so
    the value of a dict-typed option (`distillation.hidden_states.layers: {0: 1}`) stays one value."""
    leaves = known_keys() if leaves is None else leaves
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and dotted not in leaves:
            flat.update(_flatten(value, dotted + ".", leaves))
        else:
            flat[dotted] = value
    return flat


def load_config(cli_args: Sequence[str] = (), config_file: Path | str | None = None) -> LoadedConfig:
    """Build the effective configuration from CLI flags, environment, an optional YAML file and defaults."""
    config_path = Path(config_file) if config_file is not None else None
    args = _normalise_flags(cli_args)
    yaml_data = read_yaml_config(config_path) if config_path is not None else {}
    try:
        cli_source = _CliSource(
            TrainingConfig, cli_parse_args=args, cli_exit_on_error=False, cli_implicit_flags=True
        )
    except SettingsError as exc:
        raise ConfigError(str(exc).replace("error parsing CLI: ", "command line: ")) from None
    layers = {
        "cli": _flatten(cli_source()),
        "env": _flatten(_EnvSource(TrainingConfig)()),
        "yaml": _flatten(yaml_data),
    }
    token = _yaml_file.set(config_path)
    try:
        built = _LayeredTrainingConfig(_cli_settings_source=cli_source)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, layers, config_path)) from None
    except SettingsError as exc:
        raise ConfigError(f"configuration: {exc}") from None
    finally:
        _yaml_file.reset(token)
    if built.hf_token is not None:  # every command that loads a config keeps its token out of the logs
        from nlm.config.logging_setup import register_secret

        register_secret(built.hf_token.get_secret_value())
    if built.teacher_api_key is not None:  # the served teacher's key (issue 30), kept out of the logs too
        from nlm.config.logging_setup import register_secret

        register_secret(built.teacher_api_key.get_secret_value())
    sources = {key: _source_of(key, layers) for key in known_keys()}
    return LoadedConfig(config=built, sources=sources)


def _source_of(key: str, layers: Mapping[str, Mapping[str, Any]]) -> str:
    for name in ("cli", "env", "yaml"):
        if key in layers[name] or any(k.startswith(key + ".") for k in layers[name]):
            return name
    return "default"


def _describe_source(key: str, source: str, config_path: Path | None) -> str:
    if source == "cli":
        return f"from command line --{key}"
    if source == "env":
        return f"from environment NLM_{key.upper().replace('.', '__')}"
    if source == "yaml":
        return f"from {config_path}"
    return "default"


def _describe_validation_error(
    exc: ValidationError, layers: Mapping[str, Mapping[str, Any]], config_path: Path | None
) -> str:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
        # Literal/union errors append the type tried to the location; keep only real field names.
        keys = known_keys()
        while loc and ".".join(loc) not in keys and not any(k.startswith(".".join(loc) + ".") for k in keys):
            loc.pop()
        key = ".".join(loc) or "config"
        source = _source_of(key, layers) if loc else "default"
        value = error.get("input")
        shown = "**********" if key in SECRET_FIELDS else repr(value)
        message = str(error["msg"]).removeprefix("Value error, ")
        if loc:
            # Inside a list of models (train_mixture), name the item and its field: train_mixture[1].weight.
            where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][len(loc):])
            where = where if where.startswith("[") and "." in where else ""
            problems.append(f"{key}{where} = {shown} ({_describe_source(key, source, config_path)}): {message}")
        else:
            problems.append(message)
    return "; ".join(dict.fromkeys(problems))


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret settings present in the environment, for the log redaction filter."""
    environ = os.environ if environ is None else environ
    return [environ[f"NLM_{name.upper()}"] for name in SECRET_FIELDS if environ.get(f"NLM_{name.upper()}")]
