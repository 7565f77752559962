"""The `tune:` section of a training YAML: what to search, what to optimise, and each trial's budget.

```yaml
student_model: ...          # the rest of the file is an ordinary `nlm train` configuration
tune:
  metric: eval_loss          # eval_loss | eval_perplexity | eval_token_accuracy | eval_teacher_kl | eval_teacher_agreement
  trials: 24
  budget: {max_steps: 200}   # training options set in every trial (not in best.yaml)
  space:
    distillation.alpha: {low: 0.1, high: 0.9}
    learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
    distillation.divergence: [forward_kl, reverse_kl, jsd]
```

Every `space` and `budget` key is a training option by its dotted name; `load_tune` checks each one against
`TrainingConfig` (name, type, and every bound or choice as a value of that option) before any trial runs, so a
misspelt key or an out-of-range bound is one ConfigError (exit 2) naming it.
"""

from __future__ import annotations

import copy
import difflib
import os
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nlm.config.dotted import flatten
from nlm.errors import ConfigError

# Figures the trainer's evaluation reports (nlm.training.trainer.evaluation_loop); teacher_* need a teacher.
METRICS = ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_teacher_kl", "eval_teacher_agreement")
MINIMISED = ("loss", "perplexity", "kl")

# Options a trial cannot vary: where it writes (tune decides), secrets, and the eval data the metric is
# measured on (trials measured on different data are not comparable).
FIXED_BY_TUNE = {
    "output_dir": "each trial writes to DIR/trials/<number>",
    "run_name": "each trial writes to DIR/trials/<number>",
    "overwrite": "tune manages the trial folders",
    "resume": "tune manages the trial folders",
    "hf_token": "a secret is never stored in a trial's file",
    "teacher_cache": "tune shares one teacher cache when the space allows it",
    "eval_file": "every trial is measured on the same eval data",
    "eval_split": "every trial is measured on the same eval data",
}


class Range(BaseModel):
    """A numeric interval; integer options are sampled as integers."""

    model_config = ConfigDict(extra="forbid")

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: float | None = Field(None, gt=0, description="Sample on a grid of this step.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (found {self.low})")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self


class TuneSpec(BaseModel):
    """The `tune:` section."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("eval_loss", description="The eval figure to optimise: " + ", ".join(METRICS) + ".")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize for loss, perplexity and kl; maximize for accuracy and agreement.")
    trials: int = Field(20, ge=1, le=100_000, description="Trials in the study (all workers together).")
    budget: dict[str, Any] = Field(default_factory=dict, description="Training options of every trial (e.g. max_steps).")
    space: dict[str, Any] = Field(
        min_length=1, description="Training option (dotted name) -> {low, high, log, step} or a list of choices.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: tpe (learns from finished trials) or random.")
    pruner: Literal["median", "successive_halving", "none"] = Field(
        "median", description="Optuna pruner: median (stop a trial worse than the median trial at the same step), "
        "successive_halving (ASHA rungs) or none.")
    startup_trials: int = Field(5, ge=0, description="Until this many trials have finished, trials are sampled at "
                                "random (tpe) and none is pruned.")
    seed: int | None = Field(None, ge=0, description="Sampler seed (one worker at --parallel 1: the same trials again).")
    teacher_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: build one teacher cache for all trials when no searched option changes it.")
    cache_top_k: int = Field(64, ge=1, description="Teacher tokens kept per position in the shared cache.")

    @property
    def metric_key(self) -> str:
        return self.metric if self.metric.startswith("eval_") else f"eval_{self.metric}"

    @property
    def resolved_direction(self) -> str:
        if self.direction is not None:
            return self.direction
        return "minimize" if any(word in self.metric_key for word in MINIMISED) else "maximize"


@dataclass(frozen=True)
class Dimension:
    """One searched option, checked: a range (integer or not) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def candidates(self) -> list[Any]:
        """The values checked up front: both bounds, or every choice."""
        if self.choices:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]  # type: ignore[arg-type]

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TuneSetup:
    """A checked tune file: the training document (without `tune:`), the search, and its dimensions."""

    path: Path
    document: dict[str, Any]
    spec: TuneSpec
    dimensions: tuple[Dimension, ...]
    config: Any  # the TrainingConfig of `document` + budget, as a trial would load it

    def trial_document(self, params: dict[str, Any], output_dir: Path, number: int) -> dict[str, Any]:
        """The YAML document of one trial: the run's options, the budget, the sampled values, its folder."""
        document = merged(self.document, self.spec.budget)
        for key, value in params.items():
            set_dotted(document, key, value)
        document.update(output_dir=str(output_dir), run_name=str(number))
        if document.get("eval_strategy", "no") == "no":
            document["eval_strategy"] = "steps"  # intermediate figures for the pruner
        # Trials are compared, not kept: no checkpoints (the final model is written).
        document.update(save_strategy="no", load_best_model_at_end=False)
        return document

    def best_document(self, params: dict[str, Any]) -> dict[str, Any]:
        """The run's own configuration with the best values: what `nlm train --config best.yaml` trains."""
        document = copy.deepcopy(self.document)
        for key, value in params.items():
            set_dotted(document, key, value)
        return document


def set_dotted(document: dict[str, Any], key: str, value: Any) -> None:
    """`distillation.alpha` -> document["distillation"]["alpha"] (creating the inner mappings)."""
    *parents, leaf = key.split(".")
    node = document
    for part in parents:
        inner = node.get(part)
        if not isinstance(inner, dict):
            inner = node[part] = {}
        node = inner
    node[leaf] = value


def merged(document: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `document` with the (dotted or nested) `overrides` set on it."""
    result = copy.deepcopy(document)
    for key, value in flatten(overrides).items():
        set_dotted(result, key, copy.deepcopy(value))
    return result


def load_tune(path: Path | str) -> TuneSetup:
    """Read a training YAML with a `tune:` section and check everything a trial will need."""
    from nlm.config.sources import read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path)
    if "tune" not in data:
        raise ConfigError(f"config file {path}: no `tune:` section; add one with `space:` (see docs/TUNE.md)")
    raw = data.pop("tune")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: `tune:` must be a mapping (metric, trials, budget, space)")
    try:
        spec = TuneSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config file {path}: {_describe(exc, 'tune.')}") from None
    if spec.metric_key not in METRICS:
        raise ConfigError(f"config file {path}: tune.metric = {spec.metric!r}: expected one of {', '.join(METRICS)}")
    config = _load_training(path, merged(data, spec.budget), "tune.budget" if spec.budget else None)
    if config.eval_file is None and config.eval_split == 0 and not _eval_channel():
        raise ConfigError(f"config file {path}: tune needs eval data for {spec.metric_key}: set eval_file or eval_split")
    if spec.metric_key.startswith("eval_teacher") and not (config.teacher_model or config.teachers):
        raise ConfigError(f"config file {path}: tune.metric = {spec.metric!r} needs a teacher (teacher_model or teachers)")
    _check_budget(path, spec)
    dimensions = tuple(_dimension(path, key, value, merged(data, spec.budget)) for key, value in spec.space.items())
    return TuneSetup(path=path, document=data, spec=spec, dimensions=dimensions, config=config)


def _eval_channel() -> bool:
    return any(os.environ.get(f"SM_CHANNEL_{name}") for name in ("EVAL", "VALIDATION", "TEST"))


def _check_budget(path: Path, spec: TuneSpec) -> None:
    for key in flatten(spec.budget):
        if key in FIXED_BY_TUNE:
            raise ConfigError(f"config file {path}: tune.budget.{key}: cannot be set per trial ({FIXED_BY_TUNE[key]})")


def _dimension(path: Path, key: str, value: Any, document: dict[str, Any]) -> Dimension:
    from nlm.config.sources import known_keys

    keys = known_keys()
    where = f"config file {path}: tune.space.{key}"
    if key not in keys:
        close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: not a training option{hint}")
    if key in FIXED_BY_TUNE:
        raise ConfigError(f"{where}: cannot be searched ({FIXED_BY_TUNE[key]})")
    if isinstance(value, dict):
        try:
            value = Range.model_validate(value)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {_describe(exc)}") from None
        base = _numeric_base(keys[key].annotation)
        if base is None:
            raise ConfigError(f"{where}: a range needs a numeric option; give a list of choices instead")
        integer = base is int
        if integer and not all(float(v).is_integer() for v in (value.low, value.high, value.step or 1)):
            raise ConfigError(f"{where}: an integer option needs integer low, high and step")
        dimension = Dimension(key, value.low, value.high, value.log, value.step, integer)
    elif isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: an empty list of choices")
        for choice in value:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ConfigError(f"{where}: choice {choice!r} is not a plain value (number, string, bool or null)")
        dimension = Dimension(key, choices=tuple(value))
    else:
        raise ConfigError(f"{where}: expected {{low: .., high: ..}} or a list of choices, found {value!r}")
    for candidate in dimension.candidates():
        _check_value(path, key, candidate, document)
    return dimension


def _numeric_base(annotation: Any) -> type | None:
    """int or float for `int`, `float`, `int | None` ...; None for anything else."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (int, float) else None


def _check_value(path: Path, key: str, value: Any, document: dict[str, Any]) -> None:
    """The value as that option in the run's configuration: out of range, wrong type or inconsistent -> exit 2."""
    from nlm.config.settings import TrainingConfig

    candidate = merged(document, {key: value})
    try:
        TrainingConfig.model_validate(candidate)
    except ValidationError as exc:
        raise ConfigError(f"config file {path}: tune.space.{key} = {value!r}: {_describe(exc)}") from None


def _load_training(path: Path, document: dict[str, Any], budget: str | None) -> Any:
    """Load `document` exactly as `nlm train --config` would (unknown keys, secrets, types) and name the file."""
    import yaml

    from nlm.config.sources import load_config

    handle, name = tempfile.mkstemp(suffix=".yaml", prefix="nlm-tune-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            yaml.safe_dump(document, stream, sort_keys=False)
        try:
            return load_config([], Path(name)).config
        except ConfigError as exc:
            message = str(exc).replace(f"config file {name}", f"config file {path}").replace(name, str(path))
            raise ConfigError(message + (f" (with {budget})" if budget else "")) from None
    finally:
        os.unlink(name)


def _describe(exc: ValidationError, prefix: str = "") -> str:
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{prefix}{loc}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(problems))


def render_keys() -> str:
    """The `tune:` keys as a Markdown table (docs/TUNE.md holds it; a test keeps it current)."""
    lines = ["| key | default | description |", "|---|---|---|"]
    for model, prefix in ((TuneSpec, ""), (Range, "space.OPTION.")):
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"| `{prefix}{name}` | {default} | {field.description or ''} |")
    return "\n".join(lines) + "\n"
