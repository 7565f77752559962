"""`nlm pipeline run`: train a team of students, each exactly as `nlm train` would, sharing the work they have
in common, side by side, and report on all of them.

1. Read the pipeline and write each agent's merged configuration (output_dir/.pipeline/agents/<name>.yaml),
   checked by the loader `nlm train` uses. A bad agent fails alone.
2. Shared work, once (detected by the same fingerprint the runs check):
   - tokenised data: the cache key of `nlm.data.tokenize` (data files' content, tokenizer, settings). The
     pipeline tokenises every agent's data in this process, one agent after another, into
     output_dir/.cache/tokenized/ — where each run looks first — so agents with the same key share one build;
   - teacher caches (when the pipeline has `teacher_cache:`): the fingerprint a run checks its cache against
     (teacher, data content, tokenizer, temperature, sequence settings, top_k). One `nlm teacher-cache` per
     distinct fingerprint, into output_dir/.cache/teacher/<hash>/; its agents then train from it.
3. Agents run as `nlm train --config <its yaml>` child processes (torchrun for `devices` > 1).
4. output_dir/pipeline_report.json and .md; the caller exits 1 if any agent failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlm.config.paths import path_inside
from nlm.errors import NlmError
from nlm.models.model_info import METADATA_FILE
from nlm.pipeline.report import write_report
from nlm.pipeline.scheduler import Job, run_jobs
from nlm.pipeline.spec import Agent, Pipeline, load_pipeline, write_agent_config
from nlm.training.launch import Topology, train_command

logger = logging.getLogger(__name__)


@dataclass
class AgentOutcome:
    name: str
    status: str = "pending"  # finished | skipped (finished before) | failed
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    output_dir: str = ""
    final_dir: str | None = None
    log: str | None = None
    devices: int = 1
    gpus: list[int] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)  # kind -> fingerprint / folder shared with other agents

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error


@dataclass
class PipelineResult:
    pipeline: str
    output_dir: str
    agents: list[AgentOutcome]
    shared: list[dict[str, Any]]
    wall_seconds: float
    report: str

    @property
    def failed(self) -> list[AgentOutcome]:
        return [a for a in self.agents if a.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "output_dir": self.output_dir, "wall_seconds": round(self.wall_seconds, 3),
                "failed": len(self.failed), "agents": [asdict(a) for a in self.agents], "shared": self.shared}


def _final_metrics(final_dir: Path) -> dict[str, Any]:
    metadata = json.loads((final_dir / METADATA_FILE).read_text(encoding="utf-8"))
    figures = metadata.get("final_metrics", {})
    return {k: v for k, v in figures.items() if k.startswith("eval_") or k in ("train_loss", "train_runtime")}


def _prepare(agent: Agent, pipeline: Pipeline, overwrite: bool, outcome: AgentOutcome) -> tuple[Path, Any] | None:
    """Decide skip / retry for the agent, write its configuration and check it. None when it does not run."""
    from transformers.trainer_utils import get_last_checkpoint

    from nlm.config.sources import load_config

    run_dir = pipeline.output_dir / agent.name
    outcome.output_dir = str(run_dir)
    config_path = pipeline.state_dir / "agents" / f"{agent.name}.yaml"
    if (run_dir / "final" / METADATA_FILE).is_file() and not overwrite:
        outcome.status, outcome.final_dir = "skipped", str(run_dir / "final")
        outcome.metrics = _final_metrics(run_dir / "final")
        logger.info("%s: finished in an earlier run, skipped (--overwrite to train it again)", agent.name)
        return None
    document = dict(agent.document)
    started_before = run_dir.is_dir() and any(run_dir.iterdir())
    if started_before and overwrite:
        document["overwrite"] = True
    elif started_before and config_path.is_file():
        # This pipeline started the agent before and it did not finish: continue it, or start it again.
        if get_last_checkpoint(str(run_dir)):
            document["resume"] = True
            logger.info("%s: unfinished from an earlier run, resuming from its last checkpoint", agent.name)
        else:
            document["overwrite"] = True
    write_agent_config(document, config_path)
    try:
        config = load_config([], config_path).config
    except NlmError as exc:
        outcome.fail(str(exc).replace(str(config_path), f"agent '{agent.name}'"))
        return None
    return config_path, config


def _share_tokenised_data(config: Any, outcome: AgentOutcome, groups: dict[str, list[str]]) -> None:
    """Tokenise the agent's data into the cache its run reads; the first agent with a key builds it."""
    from nlm.data.files import resolve_train_files
    from nlm.data.prepare import prepare_datasets, tokenize_settings
    from nlm.data.tokenize import tokenization_key
    from nlm.models.loading import hub_options, load_tokenizer

    tokenizer = load_tokenizer(config.student_model, **hub_options(config, config.student_revision))
    key = tokenization_key(resolve_train_files(config.train_file), tokenizer, tokenize_settings(config))
    groups.setdefault(key, []).append(outcome.name)
    outcome.shared["tokenized"] = key
    prepare_datasets(config, tokenizer, cache_root=path_inside(config.output_dir, ".cache/tokenized"))


def _teacher_cache_dir(config: Any, pipeline: Pipeline) -> Path:
    from nlm.distill.cache import cache_fingerprint
    from nlm.models.loading import hub_options, load_tokenizer

    assert pipeline.teacher_cache is not None
    tokenizer = load_tokenizer(config.teacher_model, **hub_options(config, config.teacher_revision))
    fingerprint = cache_fingerprint(config, tokenizer, pipeline.teacher_cache.top_k, pipeline.teacher_cache.tail_samples)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return pipeline.output_dir / ".cache" / "teacher" / digest


def _python_nlm(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "nlm.cli", *args]


def run_pipeline(path: Path | str, only: list[str] | None = None, parallel: int | None = None,
                 overwrite: bool = False) -> PipelineResult:
    """Train the selected agents of a pipeline file; never raises for one agent's failure."""
    started = time.perf_counter()
    pipeline = load_pipeline(path)
    agents = pipeline.select(list(only or []))
    pipeline.state_dir.mkdir(parents=True, exist_ok=True)
    outcomes = {agent.name: AgentOutcome(name=agent.name, devices=agent.devices) for agent in agents}
    prepared: dict[str, tuple[Path, Any]] = {}
    for agent in agents:
        result = _prepare(agent, pipeline, overwrite, outcomes[agent.name])
        if result is not None:
            prepared[agent.name] = result

    # Shared work 1: tokenised data, once per fingerprint.
    token_groups: dict[str, list[str]] = {}
    for name, (_, config) in list(prepared.items()):
        try:
            _share_tokenised_data(config, outcomes[name], token_groups)
        except Exception as exc:  # noqa: BLE001 - one agent's bad data or tokenizer fails that agent only
            outcomes[name].fail(_one_line(exc))
            prepared.pop(name)
    shared: list[dict[str, Any]] = [{"kind": "tokenized", "fingerprint": key, "agents": names}
                                    for key, names in token_groups.items()]

    # Shared work 2: one teacher cache per fingerprint, built before the agents that train from it.
    if pipeline.teacher_cache is not None:
        shared.extend(_shared_teacher_caches(pipeline, prepared, outcomes, parallel))

    # The agents themselves.
    train_jobs = []
    for agent in agents:
        if agent.name not in prepared:
            continue
        config_path, _ = prepared[agent.name]
        log_path = _fresh_log(pipeline, agent.name)
        outcomes[agent.name].log = str(log_path)
        train_jobs.append(Job(name=agent.name, devices=agent.devices, log_path=log_path,
                              command=train_command(["--config", str(config_path)], Topology(nproc_per_node=agent.devices))))
    for job in run_jobs(train_jobs, parallel):
        outcome = outcomes[job.name]
        outcome.wall_seconds, outcome.gpus = round(job.seconds, 3), job.gpus
        final_dir = pipeline.output_dir / job.name / "final"
        if job.returncode == 0 and (final_dir / METADATA_FILE).is_file():
            outcome.status, outcome.final_dir = "finished", str(final_dir)
            outcome.metrics = _final_metrics(final_dir)
        else:
            outcome.fail(job.error or "the run wrote no final model")

    result = PipelineResult(pipeline=str(pipeline.path), output_dir=str(pipeline.output_dir),
                            agents=[outcomes[a.name] for a in agents], shared=shared,
                            wall_seconds=time.perf_counter() - started, report=str(pipeline.output_dir / "pipeline_report.json"))
    write_report(result.as_dict(), pipeline.output_dir)
    return result


def _shared_teacher_caches(pipeline: Any, prepared: dict[str, tuple[Path, Any]], outcomes: dict[str, AgentOutcome],
                           parallel: int | None) -> list[dict[str, Any]]:
    """Build one teacher cache per fingerprint for the agents that distil from a live teacher, and point their
    configs at it; an agent whose cache fails fails alone (and leaves `prepared`)."""
    built: list[dict[str, Any]] = []
    cache_groups: dict[Path, list[str]] = {}
    for name, (_, config) in list(prepared.items()):
        if config.teacher_model and config.distillation.alpha > 0 and not config.teacher_cache:
            try:
                cache_groups.setdefault(_teacher_cache_dir(config, pipeline), []).append(name)
            except Exception as exc:  # noqa: BLE001 - fails that agent only
                outcomes[name].fail(_one_line(exc))
                prepared.pop(name)
    cache_jobs = []
    for directory, names in cache_groups.items():
        settings = pipeline.teacher_cache
        cache_jobs.append(Job(
            name=f"teacher-cache {directory.name}",
            command=_python_nlm("teacher-cache", "--config", str(prepared[names[0]][0]), "--output", str(directory),
                                "--top_k", str(settings.top_k), "--tail_samples", str(settings.tail_samples),
                                "--batch_size", str(settings.batch_size),
                                # A complete cache with this fingerprint is reused even under --overwrite.
                                "--overwrite=false"),
            log_path=_fresh_log(pipeline, f"teacher-cache-{directory.name}"),
        ))
    for job, (directory, names) in zip(run_jobs(cache_jobs, parallel), cache_groups.items(), strict=True):
        built.append({"kind": "teacher_cache", "path": str(directory), "agents": names,
                       "status": "ready" if job.returncode == 0 else "failed", "error": job.error,
                       "wall_seconds": round(job.seconds, 3), "log": str(job.log_path)})
        for name in names:
            if job.returncode != 0:
                outcomes[name].fail(f"shared teacher cache {directory} failed: {job.error}")
                prepared.pop(name)
                continue
            config_path, _ = prepared[name]
            document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
            document["teacher_cache"] = str(directory)
            write_agent_config(document, config_path)
            outcomes[name].shared["teacher_cache"] = str(directory)
    return built


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, NlmError) else f"{type(exc).__name__}: {text}"


def _fresh_log(pipeline: Pipeline, name: str) -> Path:
    path = pipeline.state_dir / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# nlm pipeline run {pipeline.path}: {name}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
    return path
