"""A pipeline file: `defaults:` (any training config) and `agents:` (a name, optional `devices`, and overrides).

Each agent's configuration is `defaults` deep-merged with its overrides, with `run_name` = its name, so it
trains into `output_dir/<name>/` exactly as `nlm train --config` would. The merged configuration is written
as a YAML file and checked by the same loader as `nlm train` (`nlm.config.sources.load_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nlm.config.paths import safe_output_dir
from nlm.errors import ConfigError

# Set by the pipeline for every agent; a file that sets them would be ignored silently otherwise.
RESERVED = {"run_name": "the agent's name is its run name", "output_dir": "all agents share defaults.output_dir",
            "resume": "the pipeline resumes unfinished agents itself", "overwrite": "use `nlm pipeline run --overwrite`"}


class SharedTeacherCache(BaseModel):
    """`teacher_cache:` at the top of a pipeline: agents with the same teacher and data train from one cache."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(64, ge=1, description="teacher tokens kept per position")
    tail_samples: int = Field(0, ge=0, description="of the top_k slots, draws from the teacher's tail (docs/TEACHER_CACHE.md)")
    batch_size: int = Field(8, ge=1, description="sequences per teacher forward while building")


class AgentEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=128)
    devices: int = Field(1, ge=1, le=64, description="processes (GPUs) for this agent; > 1 launches torchrun")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        if value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0"):
            raise ValueError("must be a single folder name (no '/', '\\', or leading '.')")
        return value


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaults: dict[str, Any] = Field(default_factory=dict)
    agents: list[AgentEntry] = Field(min_length=1)
    teacher_cache: SharedTeacherCache | None = None


@dataclass
class Agent:
    name: str
    devices: int
    document: dict[str, Any]  # the merged training configuration (YAML content)


@dataclass
class Pipeline:
    path: Path
    output_dir: Path
    agents: list[Agent]
    teacher_cache: SharedTeacherCache | None = None
    state_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state_dir = self.output_dir / ".pipeline"

    def select(self, only: list[str]) -> list[Agent]:
        names = [a.name for a in self.agents]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--only {' '.join(unknown)}: no such agent in {self.path} (agents: {', '.join(names)})")
        return [a for a in self.agents if not only or a.name in only]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`; nested mappings (lora, distillation) merge key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in error["loc"]).replace(".[", "[")


def load_pipeline(path: Path | str) -> Pipeline:
    """Read and check a pipeline file (its shape; each agent's options are checked when it is prepared)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"pipeline file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline file {path}: expected a mapping with 'defaults' and 'agents'")
    try:
        spec = PipelineFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"pipeline file {path}: {_where(first)}: {first['msg'].removeprefix('Value error, ')}") from None
    for key in RESERVED:
        if key in spec.defaults and key != "output_dir":
            raise ConfigError(f"pipeline file {path}: defaults.{key} is not allowed ({RESERVED[key]})")
    names = [agent.name for agent in spec.agents]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"pipeline file {path}: agent name {', '.join(duplicates)} is used more than once")
    agents = []
    for agent in spec.agents:
        overrides = dict(agent.model_extra or {})
        for key in RESERVED:
            if key in overrides:
                raise ConfigError(f"pipeline file {path}: agent '{agent.name}' sets {key} ({RESERVED[key]})")
        document = deep_merge(spec.defaults, overrides)
        document["run_name"] = agent.name
        agents.append(Agent(name=agent.name, devices=agent.devices, document=document))
    output_dir = safe_output_dir(spec.defaults.get("output_dir", "outputs"))
    for agent in agents:
        agent.document["output_dir"] = str(output_dir)
    return Pipeline(path=path, output_dir=output_dir, agents=agents, teacher_cache=spec.teacher_cache)


def write_agent_config(document: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
