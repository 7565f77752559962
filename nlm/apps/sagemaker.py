"""The SageMaker training contract: hyperparameters, channels and /opt/ml folders in; `nlm train` run; the
model, extra outputs and a one-line failure reason out.

SageMaker starts the container as `docker run IMAGE train`. With the SageMaker training toolkit the job is
described by environment variables (SM_HPS, SM_CHANNEL_*, SM_MODEL_DIR, SM_OUTPUT_DATA_DIR, SM_OUTPUT_DIR,
SM_NUM_GPUS, SM_HOSTS, SM_CURRENT_HOST); a bare bring-your-own container only gets the /opt/ml tree
(input/config/hyperparameters.json, resourceconfig.json, input/data/<channel>/). Both are read here; the
variables win. `NLM_SAGEMAKER_ROOT` moves the /opt/ml root (tests use a temporary folder).

Hand-written because no maintained library maps this contract onto an existing CLI: the SageMaker
training toolkit runs user scripts, it does not validate hyperparameters against a schema.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlm.errors import ConfigError, NlmError

logger = logging.getLogger(__name__)

ROOT_ENV = "NLM_SAGEMAKER_ROOT"
DEFAULT_ROOT = "/opt/ml"
RUN_NAME = "distill"
# Channels with a meaning besides data: a model folder, a teacher cache, or a folder holding one YAML config.
MODEL_CHANNELS = {"teacher": "teacher_model", "student": "student_model", "teacher_cache": "teacher_cache"}
DATA_CHANNELS = ("train", "eval", "validation", "test")
CONFIG_CHANNEL = "config"
# Set by the job itself, not by hyperparameters.
JOB_KEYS = ("output_dir", "resume", "overwrite")


@dataclass
class TrainingJob:
    """One SageMaker training job as this container sees it."""

    root: Path
    hyperparameters: dict[str, Any]
    channels: dict[str, Path]
    model_dir: Path
    output_data_dir: Path
    output_dir: Path  # the failure file goes here
    checkpoint_dir: Path | None  # present when the job syncs checkpoints to S3 (managed spot training)
    num_gpus: int
    hosts: list[str] = field(default_factory=list)
    current_host: str = ""

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host) if self.current_host in self.hosts else 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def decode_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Values as the SDK sends them (JSON-encoded strings: '"reverse_kl"', '0.001', 'true') decoded; a string
    that is not JSON is kept as written. Dotted names become nested mappings (`lora.r` -> {"lora": {"r": ..}});
    the SDK's own `sagemaker_*` entries are dropped."""
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("sagemaker_"):
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        node = decoded
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"hyperparameter {key}: '{part}' is also given as a plain value")
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return decoded


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _channels(root: Path, environ: Mapping[str, str]) -> dict[str, Path]:
    """Every channel: SM_CHANNEL_<NAME> variables, else the folders under <root>/input/data/."""
    channels: dict[str, Path] = {}
    data_root = root / "input" / "data"
    if data_root.is_dir():
        channels.update({p.name.lower(): p for p in sorted(data_root.iterdir()) if p.is_dir()})
    for name, value in environ.items():
        if name.startswith("SM_CHANNEL_") and value:
            channels[name.removeprefix("SM_CHANNEL_").lower()] = Path(value)
    return channels


def _num_gpus(environ: Mapping[str, str]) -> int:
    if environ.get("SM_NUM_GPUS", "").strip():
        try:
            return max(0, int(environ["SM_NUM_GPUS"]))
        except ValueError:
            raise ConfigError(f"SM_NUM_GPUS = {environ['SM_NUM_GPUS']!r}: expected a whole number") from None
    import torch

    return torch.cuda.device_count()


def read_job(environ: Mapping[str, str] | None = None) -> TrainingJob:
    """The job from the environment and the /opt/ml tree (variables first)."""
    environ = os.environ if environ is None else environ
    root = Path(environ.get(ROOT_ENV) or DEFAULT_ROOT)
    config_dir = root / "input" / "config"
    if environ.get("SM_HPS"):
        try:
            raw = json.loads(environ["SM_HPS"])
        except ValueError as exc:
            raise ConfigError(f"SM_HPS: not valid JSON ({exc})") from None
    else:
        raw = _read_json(config_dir / "hyperparameters.json") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"hyperparameters: expected a JSON object of name: value, found {type(raw).__name__}")
    resources = _read_json(config_dir / "resourceconfig.json") or {}
    hosts = json.loads(environ["SM_HOSTS"]) if environ.get("SM_HOSTS") else list(resources.get("hosts", []))
    checkpoints = root / "checkpoints"
    return TrainingJob(
        root=root,
        hyperparameters=decode_hyperparameters(raw),
        channels=_channels(root, environ),
        model_dir=Path(environ.get("SM_MODEL_DIR") or root / "model"),
        output_data_dir=Path(environ.get("SM_OUTPUT_DATA_DIR") or root / "output" / "data"),
        output_dir=Path(environ.get("SM_OUTPUT_DIR") or root / "output"),
        checkpoint_dir=checkpoints if checkpoints.is_dir() else None,
        num_gpus=_num_gpus(environ),
        hosts=hosts,
        current_host=environ.get("SM_CURRENT_HOST") or resources.get("current_host", ""),
    )


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _config_file(job: TrainingJob, name: Any) -> Path | None:
    """The YAML named by the `config` hyperparameter (relative to the `config` channel), or the channel's only YAML."""
    folder = job.channels.get(CONFIG_CHANNEL)
    if name is not None:
        path = Path(str(name))
        if not path.is_absolute() and folder is not None and (folder / path).is_file():
            path = folder / path
        if not path.is_file():
            raise ConfigError(f"hyperparameter config = {name!r}: no such file (relative names are looked up in the config channel)")
        return path
    if folder is None:
        return None
    found = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if len(found) != 1:
        raise ConfigError(f"config channel {folder}: expected one *.yaml file, found {len(found)}; "
                          "or name it with the 'config' hyperparameter")
    return found[0]


def run_folder(job: TrainingJob) -> Path:
    """Where `nlm train` writes: the checkpoint folder (synced to S3, restored on a spot restart) when the job
    has one, else a scratch folder on the job's storage volume."""
    return job.checkpoint_dir if job.checkpoint_dir is not None else job.output_dir / "nlm-work"


def training_arguments(job: TrainingJob) -> tuple[list[str], Path | None]:
    """`nlm train` flags from the hyperparameters and channels, and the YAML config file if any.

    Channels fill what hyperparameters leave unset (teacher, student, teacher_cache); the job sets where the
    run is written and whether it resumes.
    """
    hps = dict(job.hyperparameters)
    config_file = _config_file(job, hps.pop("config", None))
    flat = _flat(hps)
    if "hf_token" in flat:
        raise ConfigError("hyperparameter hf_token: secrets must not be hyperparameters (they show in the console); "
                          "pass NLM_HF_TOKEN in the estimator's environment")
    for key in JOB_KEYS:
        if key in flat:
            logger.warning("hyperparameter %s is ignored: the training job decides it", key)
            flat.pop(key)
    for channel, option in MODEL_CHANNELS.items():
        if channel in job.channels and option not in flat:
            flat[option] = str(job.channels[channel])
    args = [f"--{key}={_cli_value(value)}" for key, value in flat.items() if value is not None]
    run_name = str(flat.get("run_name", RUN_NAME))
    args.append(f"--output_dir={run_folder(job)}")
    run_dir = run_folder(job) / run_name
    if run_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in run_dir.iterdir()):
        logger.info("%s holds checkpoints: resuming them if they are this job's (its fingerprint is checked)", run_dir)
        args.append("--resume=true")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        args.append("--overwrite=true")  # our own scratch run from an attempt that saved no checkpoint
    return args, config_file


def channel_environment(job: TrainingJob) -> dict[str, str]:
    """SM_CHANNEL_* for every channel, so the run's data resolution finds them (a bare container has none)."""
    return {f"SM_CHANNEL_{name.upper()}": str(path) for name, path in job.channels.items()}


def validate(args: list[str], config_file: Path | None, environ: Mapping[str, str]) -> Any:
    """The configuration `nlm train` will build, checked here first; messages name hyperparameters."""
    from nlm.config.sources import load_config

    try:
        loaded = load_config(args, config_file)
    except ConfigError as exc:
        message = re.sub(r"from command line --([\w.]+)", r"from hyperparameter \1", str(exc))
        message = re.sub(r"unknown option --([\w.]+)", r"unknown hyperparameter \1", message)
        raise ConfigError(message) from None
    from nlm.data.files import resolve_train_files

    resolve_train_files(loaded.config.train_file, environ)  # a clear error now rather than in every process
    return loaded.config


def publish_model(job: TrainingJob, run_dir: Path) -> None:
    """final/ (or final/merged/ for a LoRA run that merged) into SM_MODEL_DIR, as `nlm serve` reads it; the
    run's metadata and figures into SM_OUTPUT_DATA_DIR."""
    final = run_dir / "final"
    merged = final / "merged"
    source = merged if merged.is_dir() else final
    job.model_dir.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == "merged":
            continue
        target = job.model_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    from nlm.models.model_info import METADATA_FILE

    if source is merged:
        shutil.copy2(final / METADATA_FILE, job.model_dir / METADATA_FILE)  # serving reads the prompt separator
        adapter = job.model_dir / "adapter"
        adapter.mkdir(exist_ok=True)
        for item in final.iterdir():
            if item.is_file() and item.name.startswith("adapter_"):
                shutil.copy2(item, adapter / item.name)
    job.output_data_dir.mkdir(parents=True, exist_ok=True)
    metadata = json.loads((final / METADATA_FILE).read_text(encoding="utf-8"))
    shutil.copy2(final / METADATA_FILE, job.output_data_dir / METADATA_FILE)
    (job.output_data_dir / "metrics.json").write_text(json.dumps(metadata.get("final_metrics", {}), indent=2) + "\n")


def write_failure(job_output_dir: Path, reason: str) -> None:
    """SageMaker shows the first line of this file as the job's FailureReason."""
    from nlm.config.logging_setup import redact

    try:
        job_output_dir.mkdir(parents=True, exist_ok=True)
        (job_output_dir / "failure").write_text(redact(reason.strip().splitlines()[0] if reason.strip() else "failed") + "\n")
    except OSError as exc:
        logger.error("could not write the failure file in %s: %s", job_output_dir, exc)


def same_job(run_dir: Path, config: Any, environ: Mapping[str, str]) -> bool:
    """Whether the work folder `run_dir` may be reused: empty, or started with this job's fingerprint
    (settings, data hashes, models: a restarted job). Bad data raises here (DataError), as on a first run."""
    from nlm.training.fingerprint import read_fingerprint, run_fingerprint

    fingerprint = json.loads(json.dumps(run_fingerprint(config, environ)))
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return True
    started = read_fingerprint(run_dir)
    if started == fingerprint:
        return True
    logger.warning("%s was started by another job (fingerprint %s; this job's is %s): starting afresh there",
                   run_dir, _digest(started), _digest(fingerprint))
    return False


def _digest(fingerprint: Any) -> str:
    import hashlib

    if fingerprint is None:
        return "none"
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def run_training_job(environ: Mapping[str, str] | None = None) -> int:
    """Read the job, run `nlm train` (one process per GPU), publish the model. Raises NlmError on failure."""
    from nlm.models.model_info import METADATA_FILE
    from nlm.training.launch import Topology, child_environment, run_logged, train_command

    environ = dict(os.environ if environ is None else environ)
    job = read_job(environ)
    args, config_file = training_arguments(job)
    env = child_environment(channel_environment(job), base=environ)
    config = validate(args, config_file, env)
    run_dir = run_folder(job) / config.run_name
    reuse = same_job(run_dir, config, env)
    if not reuse:
        args = [a for a in args if not a.startswith(("--resume=", "--overwrite="))] + ["--overwrite=true"]
    if reuse and (run_dir / "final" / METADATA_FILE).is_file():
        logger.info("%s already holds the finished model (a restarted job): publishing it", run_dir)
    else:
        topology = Topology(
            nproc_per_node=max(1, job.num_gpus), nnodes=max(1, len(job.hosts)), node_rank=job.node_rank,
            master_addr=job.hosts[0] if job.hosts else None,
        )
        command = train_command([*(["--config", str(config_file)] if config_file else []), *args], topology)
        logger.info("starting: %s", " ".join(command))
        code, reason = run_logged(command, env, echo=True)
        if code != 0:
            raise NlmError(reason or f"training exited with code {code}")
    if job.node_rank == 0:
        publish_model(job, run_dir)
        logger.info("model written to %s", job.model_dir)
    return 0
