"""`nlm tune`: the study. Optuna keeps the trials (RDB storage), samples (TPE or random) and prunes (median or
successive halving); this module only wires them to `nlm train` runs.

1. `load_tune` checks the file; the output folder is claimed (or, holding this study already, continued).
2. Storage: DIR/tune.db (sqlite) unless `--storage URL` (any SQLAlchemy URL: PostgreSQL, MySQL); the study is
   created or loaded by name (`load_if_exists`), so a re-run, or the same command on another machine with the
   same storage, joins it. Heartbeats mark the trials of a worker that died as failed.
3. Shared work once (nlm.tune.shared), then `study.optimize` from `parallel` threads, each trial an
   `nlm train` child on its own slot (a GPU, or a share of the CPU cores) — `MaxTrialsCallback` stops every
   worker when the study holds `trials` finished trials.
4. best.yaml, tune_report.md and the plots (nlm.tune.report).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlm.config.paths import claim_folder, mark_folder, read_marker, safe_output_dir
from nlm.errors import ConfigError
from nlm.tune.report import shown_url
from nlm.tune.spec import TuneSetup, load_tune

logger = logging.getLogger("nlm.tune")

# What `nlm tune` writes directly inside its folder (trials/ is marked on its own; each run in it by `nlm train`).
TUNE_ENTRIES = ("tune.db", "tune.db-*", ".tune", "best.yaml", "tune_report.md", "*.png", "*.partial")
CREATED_BY = "nlm tune"
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class TuneResult:
    output_dir: Path
    study_name: str
    best: dict[str, Any] | None  # number, value, params
    counts: dict[str, int]
    report: Path
    best_yaml: Path | None
    wall_seconds: float


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("nlm tune needs Optuna: run `pip install optuna matplotlib` "
                          "(or: pip install -e '.[tune]' in the nlm checkout)") from None
    return optuna


def run_tune(config_path: Path | str, output_dir: Path | str | None = None, trials: int | None = None,
             parallel: int | None = None, storage: str | None = None, study_name: str | None = None) -> TuneResult:
    """Run (or continue) the study of a tune file; never raises for one trial's failure."""
    optuna = require_optuna()
    _route_optuna_logs(optuna)
    started = time.perf_counter()
    setup = load_tune(config_path)
    total = trials or setup.spec.trials
    root = safe_output_dir(output_dir or Path(setup.config.output_dir) / "tune")
    name = study_name or Path(config_path).stem
    _claim(root, name)
    url = storage or f"sqlite:///{root / 'tune.db'}"
    study = _open_study(optuna, url, name, setup)
    _remember(root, name, url if storage is None else None)

    from nlm.pipeline.scheduler import visible_gpus
    from nlm.tune.report import write_outputs
    from nlm.tune.trial import Slots, TrialFailed, make_objective

    gpus = visible_gpus()
    width = parallel or max(1, len(gpus))
    if gpus and width > len(gpus):
        logger.warning("--parallel %d but %d GPU(s): %d trials at a time, one per GPU", width, len(gpus), len(gpus))
        width = len(gpus)
    slots = Slots(width, gpus, os.cpu_count() or 1, "OMP_NUM_THREADS" in os.environ)
    left = total - _finished(study)
    try:
        if left > 0:
            from nlm.tune.shared import build_teacher_cache, cache_plan, tokenize_once

            tokenize_once(setup.config.model_copy(update={"output_dir": root / "trials"}), root / "trials")
            reason = cache_plan(setup)
            cache = build_teacher_cache(setup, root, setup.spec.cache_top_k) if reason is None else None
            if reason is not None and setup.config.teacher_model:
                logger.info("trials run the live teacher: %s", reason)
            logger.info("study %s: %d trial(s) to run (%d finished), %d at a time", name, left, total - left, width)
            study.optimize(make_objective(setup, root, slots, cache), n_trials=left, n_jobs=width,
                           catch=(TrialFailed,),
                           callbacks=[optuna.study.MaxTrialsCallback(total, states=_states(optuna))])
        else:
            logger.info("study %s already holds %d finished trial(s) (--trials %d): writing the report only",
                        name, total - left, total)
    finally:
        outputs = write_outputs(study, setup, root, url, wall_seconds=time.perf_counter() - started)
    return TuneResult(output_dir=root, study_name=name, best=outputs["best"], counts=outputs["counts"],
                      report=outputs["report"], best_yaml=outputs["best_yaml"],
                      wall_seconds=time.perf_counter() - started)


class _OneLineFailures(logging.Filter):
    """A failed trial is one log line (its reason), not a traceback of our own TrialFailed (unless --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from nlm.tune.trial import TrialFailed

        if record.exc_info and isinstance(record.exc_info[1], TrialFailed) and not logger.isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


def _route_optuna_logs(optuna: Any) -> None:
    """Optuna's log lines go through nlm's handler (text or JSON, redacted) instead of its own."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optimize_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _OneLineFailures) for f in optimize_logger.filters):
        optimize_logger.addFilter(_OneLineFailures())


def _claim(root: Path, name: str) -> None:
    """A new folder is claimed; a folder `nlm tune` made for this study is continued; anything else refused."""
    marker = read_marker(root) if root.is_dir() else None
    if marker is not None and marker.get("created_by") == CREATED_BY:
        earlier = _state(root).get("study")
        if earlier not in (None, name):
            raise ConfigError(f"{root} holds the study '{earlier}'; continue it with --study {earlier}, or give "
                              "another --output_dir for a new study")
    else:
        claim_folder(root, created_by=CREATED_BY, owns=TUNE_ENTRIES, overwrite=False,
                     exists_message=f"{root} already holds files that are not an `nlm tune` study; "
                                    "give another --output_dir")
    mark_folder(root / "trials", CREATED_BY, owns=(".cache",))
    for sub in ("trials", "logs"):
        (root / ".tune" / sub).mkdir(parents=True, exist_ok=True)


def _state(root: Path) -> dict[str, Any]:
    path = root / ".tune" / "study.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _remember(root: Path, name: str, local_url: str | None) -> None:
    (root / ".tune").mkdir(parents=True, exist_ok=True)
    (root / ".tune" / "study.json").write_text(json.dumps({"study": name, "local_storage": local_url}) + "\n",
                                               encoding="utf-8")


def _open_study(optuna: Any, url: str, name: str, setup: TuneSetup) -> Any:
    spec = setup.spec
    storage = _storage(optuna, url)
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.pruner == "median":
        # Median: with a few tens of trials and a handful of evals each, "worse than the median trial at the
        # same step" is the rule that still has enough trials to compare against.
        pruner: Any = optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials)
    elif spec.pruner == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner()
    else:
        pruner = optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=spec.resolved_direction,
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    except ValueError as exc:  # an existing study with another direction
        raise ConfigError(f"study '{name}': {exc}") from None
    if study.direction.name.lower() != spec.resolved_direction:
        raise ConfigError(f"study '{name}' in {shown_url(url)} was created to {study.direction.name.lower()}, but "
                          f"tune.metric {spec.metric_key} is to {spec.resolved_direction}; give another --study")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning: the name only labels the plots
        study.set_metric_names([spec.metric_key])
    return study


def _storage(optuna: Any, url: str) -> Any:
    from nlm.config.logging_setup import register_secret

    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any parse failure is the user's URL
        raise ConfigError(f"--storage {url!r}: not a database URL (e.g. sqlite:///tune.db, "
                          "postgresql://user:password@host/db)") from None
    if parsed.password:
        register_secret(str(parsed.password))
    engine: dict[str, Any] = {}
    if parsed.drivername.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}  # several processes share one file
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=120)
        except Exception as exc:  # noqa: BLE001 - driver missing, host unreachable, bad credentials
            # Workers that open a new database at the same moment race to create its tables (the loser sees
            # "UNIQUE constraint failed: alembic_version..." or a locked file); once one has, the rest open it.
            racing = "UNIQUE constraint" in str(exc) or "already exists" in str(exc) or "locked" in str(exc)
            if racing and attempt < 5:
                time.sleep(1 + attempt)
                continue
            raise ConfigError(f"--storage {shown_url(url)}: cannot open it ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    raise AssertionError("unreachable")


def _states(optuna: Any) -> tuple[Any, ...]:
    return tuple(getattr(optuna.trial.TrialState, state) for state in FINISHED)


def _finished(study: Any) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=_states(optuna)))
