"""A command's options from its pydantic `Options` model: argparse flags, environment variables and a YAML file.

Every command module has `class Options(BaseModel)`; this module derives, from that one model:
- the flags: `--field_name` per field; `bool` -> `--flag/--no-flag`; `list[...]` -> repeatable and multi-value
  (`--only a b --only c`); `Literal[...]` -> choices; `json_schema_extra={"positional": True}` -> a positional;
  `{"aliases": ["--old-name"]}` -> extra spellings; `{"file": True}` -> an input file, checked to exist and be
  readable before the command runs; the description, range and default make the help line;
- `NLM_<COMMAND>__<FIELD>` environment variables (`NLM_SERVE__PORT=9000`, `NLM_DATA_INSPECT__JSON=true`);
- `--config FILE.yaml` holding the same keys, unless the command has its own `config` field (then `--config` is
  that field, e.g. a training YAML, and is handed to the command untouched);
- a field marked `{"training_flags": True}` (a `list[str]`) receives every argument the command's own flags do
  not know: the TrainingConfig flags (`--lora.r 8`) that `train`, `teacher-cache`, `config show` pass on to
  `nlm.config.sources.load_config`.
Precedence, highest first: command line > environment > YAML > default, as for `nlm train`.

argparse only collects strings; pydantic converts and validates them (so a value from the environment or YAML
is checked by the same rule as a flag), and each error becomes one line naming the flag, variable or file key.
pydantic-settings' own CLI source is not used here because it cannot mark positionals, aliases or pass unknown
arguments through; the three-layer merge is a dict update.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from nlm.errors import ConfigError


class Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (exit 2, one line) instead of printing usage and exiting itself."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        where = self.prog.removeprefix("nlm").strip()
        raise ConfigError(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class OptionSpec:
    """How one Options field shows up on the command line."""

    name: str
    field: FieldInfo
    base: Any  # the annotation without None / list[...]: int, float, str, Path, bool, Literal[...]
    is_list: bool
    optional: bool  # None is allowed

    @property
    def extra(self) -> dict[str, Any]:
        extra = self.field.json_schema_extra
        return extra if isinstance(extra, dict) else {}

    @property
    def positional(self) -> bool:
        return bool(self.extra.get("positional"))

    @property
    def training_flags(self) -> bool:
        return bool(self.extra.get("training_flags"))

    @property
    def is_bool(self) -> bool:
        return self.base is bool and not self.is_list

    @property
    def choices(self) -> list[Any] | None:
        return list(typing.get_args(self.base)) if typing.get_origin(self.base) is Literal else None

    @property
    def secret(self) -> bool:
        return self.base is SecretStr

    @property
    def flag(self) -> str:
        return self.name if self.positional else f"--{self.name}"


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """(base type, is a list, allows None) of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str  # a union of several types arrives as text
        origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, Sequence):
        inner = typing.get_args(annotation)
        return (inner[0] if inner else str), True, optional
    return annotation, False, optional


def option_specs(options_cls: type[BaseModel]) -> list[OptionSpec]:
    specs = []
    for attribute, field in options_cls.model_fields.items():
        base, is_list, optional = _unwrap(field.annotation)
        # An alias names the flag when the attribute cannot (`json` would shadow BaseModel.json).
        specs.append(OptionSpec(field.alias or attribute, field, base, is_list, optional))
    return specs


def has_own_config_field(options_cls: type[BaseModel]) -> bool:
    """A command whose Options has `config` takes `--config` as that field (e.g. a training YAML)."""
    return "config" in options_cls.model_fields


def env_prefix(command: str) -> str:
    """`serve` -> `NLM_SERVE__`, `data inspect` -> `NLM_DATA_INSPECT__`, `teacher-cache` -> `NLM_TEACHER_CACHE__`."""
    return "NLM_" + command.upper().replace(" ", "_").replace("-", "_") + "__"


# --- help -------------------------------------------------------------------------------------------


def _kind(spec: OptionSpec) -> str:
    if spec.base is int:
        return "an integer"
    if spec.base is float:
        return "a number"
    return "a value"


def _bounds(field: FieldInfo) -> list[str]:
    parts = []
    for item in field.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, name, None) is not None:
                parts.append(f"{symbol} {getattr(item, name)}")
    return parts


def allowed_text(spec: OptionSpec) -> str:
    """What a value must be, in words: 'an integer >= 1 and <= 65535', 'one of cuda, mps, cpu'."""
    if spec.extra.get("expected"):
        return str(spec.extra["expected"])
    if spec.choices:
        return "one of " + ", ".join(str(c) for c in spec.choices)
    bounds = _bounds(spec.field)
    if bounds:
        return f"{_kind(spec)} " + " and ".join(bounds)
    if spec.base in (int, float):
        return _kind(spec)
    return ""


def default_text(spec: OptionSpec) -> str | None:
    if spec.field.is_required():
        return None
    value = spec.field.get_default(call_default_factory=True)
    return repr(value) if isinstance(value, str) else str(value)


def _help_line(spec: OptionSpec) -> str:
    parts = [spec.field.description or ""]
    allowed = allowed_text(spec)
    if allowed and not spec.choices:
        parts.append(f"({allowed})")
    if spec.field.is_required():
        parts.append("(required)")
    elif not spec.is_bool and spec.field.get_default(call_default_factory=True) not in (None, []):
        parts.append(f"[default: {default_text(spec)}]")
    return " ".join(p for p in parts if p).replace("%", "%%")


def build_parser(command: str, options_cls: type[BaseModel], description: str | None = None,
                 epilog: str | None = None) -> Parser:
    """The argparse parser of one command. Values stay strings; absent flags stay absent (SUPPRESS)."""
    parser = Parser(
        prog=f"nlm {command}", description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
    )
    if not has_own_config_field(options_cls):
        parser.add_argument("--config", metavar="FILE",
                            help=f"YAML file of these options (keys as below; environment: {env_prefix(command)}<OPTION>)")
    for spec in option_specs(options_cls):
        if spec.training_flags:
            continue
        names = [spec.flag, *spec.extra.get("aliases", [])]
        kwargs: dict[str, Any] = {"help": _help_line(spec), "dest": spec.name}
        if spec.choices:
            kwargs["metavar"] = "{" + ",".join(str(c) for c in spec.choices) + "}"
        elif spec.name == "config":
            kwargs["metavar"] = "FILE"
        if spec.positional:
            kwargs.pop("dest")
            kwargs["nargs"] = "?"
            parser.add_argument(spec.name, **kwargs)
        elif spec.is_bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif spec.is_list:
            parser.add_argument(*names, nargs="+", action="extend", **kwargs)
        else:
            parser.add_argument(*names, **kwargs)
    return parser


# --- sources ----------------------------------------------------------------------------------------


def _env_value(spec: OptionSpec, text: str) -> Any:
    """Lists from the environment: a JSON list or comma-separated; everything else is validated by pydantic."""
    if spec.is_list:
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError:
                pass
        return [item.strip() for item in stripped.split(",") if item.strip()]
    return text


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_yaml(path: Path, specs: Sequence[OptionSpec], command: str) -> dict[str, Any]:
    from nlm.config.sources import read_yaml_mapping

    data = read_yaml_mapping(path)
    names = {s.name: s for s in specs if not s.training_flags}
    for key in data:
        if key not in names:
            raise ConfigError(f"config file {path}: unknown key '{key}' for 'nlm {command}'{_suggest(str(key), list(names))}")
        if names[key].secret:
            raise ConfigError(f"config file {path}: '{key}' is a secret and must not be stored in a file; "
                              f"set {env_prefix(command)}{key.upper()} in the environment or pass --{key}")
    return data


def _unknown_arguments(command: str, rest: Sequence[str], specs: Sequence[OptionSpec]) -> ConfigError:
    flags = [f"--{s.name}" for s in specs if not s.positional and not s.training_flags]
    first = next((a for a in rest if a.startswith("-")), rest[0])
    hint = _suggest(first.split("=")[0], flags) if first.startswith("--") else ""
    return ConfigError(f"{command}: unknown argument{'s' if len(rest) > 1 else ''} {' '.join(rest)}{hint}")


def parse_options(command: str, options_cls: type[BaseModel], argv: Sequence[str],
                  environ: Mapping[str, str] | None = None, parser: Parser | None = None) -> BaseModel:
    """Flags > NLM_<COMMAND>__<FIELD> environment > --config YAML > defaults, validated by `options_cls`."""
    environ = os.environ if environ is None else environ
    specs = option_specs(options_cls)
    parser = parser or build_parser(command, options_cls)
    namespace, rest = parser.parse_known_args(list(argv))
    given = vars(namespace)
    passthrough = next((s for s in specs if s.training_flags), None)
    if rest and passthrough is None:
        raise _unknown_arguments(command, rest, specs)

    prefix = env_prefix(command)
    layers: dict[str, dict[str, Any]] = {"yaml": {}, "env": {}, "cli": {}}
    yaml_path = None
    if not has_own_config_field(options_cls) and given.get("config") is not None:
        yaml_path = Path(given.pop("config"))
        layers["yaml"] = _read_yaml(yaml_path, specs, command)
    for spec in specs:
        if spec.training_flags:
            continue
        variable = prefix + spec.name.upper()
        if environ.get(variable) not in (None, ""):
            layers["env"][spec.name] = _env_value(spec, environ[variable])
    known_variables = {prefix + s.name.upper() for s in specs}
    for variable in environ:
        if variable.startswith(prefix) and variable not in known_variables:
            raise ConfigError(f"environment variable {variable} is not an option of 'nlm {command}'"
                              f"{_suggest(variable, sorted(known_variables))}")
    layers["cli"] = dict(given)
    if passthrough is not None:
        layers["cli"][passthrough.name] = list(rest)

    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name in ("yaml", "env", "cli"):
        for key, value in layers[name].items():
            merged[key] = value
            source[key] = name
    try:
        options = options_cls.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(command, exc, {s.name: s for s in specs}, source, yaml_path)) from None
    _check_files(command, options, specs, source, yaml_path)
    return options


def _check_files(command: str, options: BaseModel, specs: Sequence[OptionSpec], source: Mapping[str, str],
                 yaml_path: Path | None) -> None:
    """Fields marked `{"file": True}` name an input file: it must exist and be readable, before `run` loads
    anything (exit 2 naming the flag, variable or file key)."""
    from nlm.data.files import check_data_file

    values = options.model_dump(by_alias=True)
    for spec in specs:
        if spec.extra.get("file") and values.get(spec.name) is not None:
            for value in values[spec.name] if spec.is_list else [values[spec.name]]:
                check_data_file(value, f"{command} {_where(spec, source.get(spec.name), command, yaml_path)}")


def _where(spec: OptionSpec, source: str | None, command: str, yaml_path: Path | None) -> str:
    if source == "env":
        return f"{env_prefix(command)}{spec.name.upper()} (environment)"
    if source == "yaml":
        return f"{spec.name} in {yaml_path}"
    return spec.flag


def _describe(command: str, exc: ValidationError, specs: Mapping[str, OptionSpec], source: Mapping[str, str],
              yaml_path: Path | None) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        spec = specs.get(name)
        if spec is None:
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        where = _where(spec, source.get(name), command, yaml_path)
        kind = error["type"]
        if kind == "missing":
            problems.append(f"{where} is required")
            continue
        allowed = allowed_text(spec)
        if kind in ("int_parsing", "int_from_float", "float_parsing") and not spec.extra.get("expected"):
            expected = _kind(spec)
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                      "int_parsing", "float_parsing", "int_from_float") and allowed:
            expected = allowed
        else:
            expected = str(error["msg"]).removeprefix("Value error, ")
            expected = expected[0].lower() + expected[1:] if expected else expected
        shown = "**********" if spec.secret else repr(error.get("input"))
        problems.append(f"{where}: expected {expected}, got {shown}" if not expected.startswith(("must", "expected"))
                        else f"{where}: {expected}, got {shown}")
    return f"{command} " + "; ".join(dict.fromkeys(problems))


# --- reference --------------------------------------------------------------------------------------


def reference_rows(command: str, options_cls: type[BaseModel]) -> list[str]:
    """Markdown table rows (flag, environment, default, allowed, description) for docs/CONFIGURATION.md."""
    rows = []
    for spec in option_specs(options_cls):
        if spec.training_flags:
            continue
        flag = spec.name if spec.positional else "--" + spec.name
        default = "required" if spec.field.is_required() else f"`{default_text(spec)}`"
        allowed = allowed_text(spec) or ("true/false" if spec.is_bool else "list" if spec.is_list else "text")
        description = (spec.field.description or "").replace("|", "\\|")
        env = f"`{env_prefix(command)}{spec.name.upper()}`"
        rows.append(f"| `{flag}` | {env} | {default.replace('|', chr(92) + '|')} | {allowed.replace('|', chr(92) + '|')} | {description} |")
    return rows
