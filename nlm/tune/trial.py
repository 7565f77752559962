"""One trial: sample the space, write the trial's config, run it as `nlm train`, report its eval figures.

The child is exactly `nlm train --config DIR/.tune/trials/<number>.yaml`, writing DIR/trials/<number>/, with
JSON log lines (`--log_format json`). Each eval line it prints carries the metric and the step; they go to
Optuna (`trial.report`) as they arrive, and when the pruner says so the child is stopped and the trial is
pruned. The trial's value is the metric of the run's final evaluation (`final/training_metadata.json`).
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlm.errors import NlmError
from nlm.models.model_info import METADATA_FILE
from nlm.training.launch import child_environment, run_logged, train_command

logger = logging.getLogger("nlm.tune")


class TrialFailed(Exception):
    """A trial that could not run or whose run failed; its one-line reason is the message."""


@dataclass
class EvalWatcher:
    """Reads the child's JSON log lines, reports each eval figure once per step, and says when to stop."""

    trial: Any
    metric: str
    reported: dict[int, float] = field(default_factory=dict)
    pruned_at: int | None = None

    def __call__(self, line: str) -> bool:
        if not line.startswith("{") or self.metric not in line:
            return False
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        value, step = entry.get(self.metric), entry.get("step")
        if not isinstance(value, (int, float)) or not isinstance(step, int) or step in self.reported:
            return False
        self.reported[step] = float(value)
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


class Slots:
    """Where trials run: one GPU each when there are GPUs, else K CPU slots sharing the cores."""

    def __init__(self, parallel: int, gpus: list[int], cpu_count: int, omp_set: bool) -> None:
        self.items: queue.Queue[dict[str, str]] = queue.Queue()
        if gpus:
            for gpu in gpus[:parallel]:
                self.items.put({"CUDA_VISIBLE_DEVICES": str(gpu)})
        else:
            threads = {} if omp_set else {"OMP_NUM_THREADS": str(max(1, cpu_count // parallel))}
            for _ in range(parallel):
                self.items.put(dict(threads))

    def size(self) -> int:
        return self.items.qsize()


def make_objective(setup: Any, root: Path, slots: Slots, teacher_cache: Path | None) -> Any:
    """The function Optuna calls once per trial (from `parallel` threads at once)."""
    import optuna

    metric = setup.spec.metric_key

    def objective(trial: optuna.Trial) -> float:
        params = {dimension.key: dimension.suggest(trial) for dimension in setup.dimensions}
        env = slots.items.get()
        started = time.perf_counter()
        try:
            trial.set_user_attr("output_dir", str(root / "trials" / str(trial.number)))
            config_path = _write_config(setup, root, trial.number, params, teacher_cache)
            log_path = root / ".tune" / "logs" / f"{trial.number}.log"
            log_path.write_text(f"# nlm tune: trial {trial.number} {json.dumps(params)}\n", encoding="utf-8")
            watcher = EvalWatcher(trial, metric)
            command = train_command(["--config", str(config_path), "--log_format", "json"])
            logger.info("trial %d: started %s%s", trial.number, _describe(params),
                        f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else "")
            returncode, error = run_logged(command, child_environment(env), log_path, on_line=watcher)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            if watcher.pruned_at is not None:
                trial.set_user_attr("pruned_at", watcher.pruned_at)
                raise optuna.TrialPruned(f"trial {trial.number} pruned at step {watcher.pruned_at}")
            if returncode != 0:
                raise TrialFailed(error or f"training exited with code {returncode}")
            return _final_value(root / "trials" / str(trial.number) / "final", metric, watcher)
        except TrialFailed as exc:
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            raise
        finally:
            slots.items.put(env)

    return objective


def _write_config(setup: Any, root: Path, number: int, params: dict[str, Any], teacher_cache: Path | None) -> Path:
    from nlm.config.sources import load_config

    document = setup.trial_document(params, root / "trials", number)
    if teacher_cache is not None and _uses_teacher(document):
        document["teacher_cache"] = str(teacher_cache)
    path = root / ".tune" / "trials" / f"{number}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    try:
        load_config([], path)  # a combination no single bound showed (e.g. learned temperature out of its bounds)
    except NlmError as exc:
        raise TrialFailed(str(exc)) from None
    return path


def _uses_teacher(document: dict[str, Any]) -> bool:
    alpha = (document.get("distillation") or {}).get("alpha", 0.5)
    return float(alpha) > 0


def _final_value(final_dir: Path, metric: str, watcher: EvalWatcher) -> float:
    try:
        figures = json.loads((final_dir / METADATA_FILE).read_text(encoding="utf-8")).get("final_metrics", {})
    except (OSError, ValueError):
        figures = {}
    value = figures.get(metric)
    if isinstance(value, (int, float)):
        return float(value)
    if watcher.reported:
        return watcher.reported[max(watcher.reported)]
    raise TrialFailed(f"the run reported no {metric} (is there eval data?)")


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={_short(value)}" for key, value in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
