"""`nlm publish`: a final/ or export folder -> a new MLflow model version with its lineage, alias on request.

The registry is MLflow's (MlflowClient): one MLflow run per publish holds the folder as artifacts, the
training lineage as params and tags and the eval metrics as metrics; the model version points at those
artifacts and carries the same tags. `--only_if_better` moves the alias only when the metric improves.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nlm.errors import ConfigError
from nlm.export.output import EXPORT_METADATA_FILE
from nlm.models.model_info import training_metadata

logger = logging.getLogger(__name__)

EXPERIMENT = "nlm-publish"
# Metrics where lower is better; every other metric (accuracy, agreement, exact match) is higher-better.
LOWER_IS_BETTER = ("loss", "perplexity", "kl")


@dataclass
class PublishResult:
    name: str
    version: str
    run_id: str
    alias: str | None
    alias_moved: bool
    reason: str


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


def resolve_model_dir(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir() and (path / "final").is_dir() and not (path / "config.json").is_file():
        path = path / "final"
    if not path.is_dir():
        raise ConfigError(f"--model {model}: folder not found (expected a final/ or export folder)")
    if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")) and not any(path.glob("*.gguf")):
        raise ConfigError(f"--model {model}: {path} holds no model (config.json, adapter_config.json or *.gguf)")
    return path.resolve()


def lineage(model_dir: Path) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """(params, tags, metrics) from training_metadata.json and export_metadata.json; secrets never included."""
    meta = training_metadata(model_dir)
    config = meta.get("config", {})
    distill = config.get("distillation", {})
    lora = config.get("lora", {})
    params = {
        "teacher": (meta.get("teacher") or {}).get("model") or config.get("teacher_model"),
        "teacher_cache": (meta.get("teacher") or {}).get("teacher_cache"),
        "student": (meta.get("student") or {}).get("model") or config.get("student_model"),
        "alpha": distill.get("alpha"), "temperature": distill.get("temperature"),
        "divergence": distill.get("divergence"), "loss_impl": meta.get("loss_impl"),
        "lora": lora.get("enabled"), "lora_r": lora.get("r") if lora.get("enabled") else None,
        "learning_rate": config.get("learning_rate"), "max_seq_length": config.get("max_seq_length"),
        "global_step": meta.get("global_step"), "precision": meta.get("precision"),
    }
    data = meta.get("data", {})
    tags = {
        "nlm.git_commit": meta.get("git_commit"),
        "nlm.run_name": config.get("run_name"),
        "nlm.teacher_revision": (meta.get("teacher") or {}).get("revision"),
        "nlm.student_revision": (meta.get("student") or {}).get("revision"),
        # data files with their sha256 (path -> hash), as training_metadata.json records them
        "nlm.train_files": json.dumps(data["train_files"]) if data.get("train_files") else None,
        "nlm.eval_files": json.dumps(data["eval_files"]) if data.get("eval_files") else None,
        "nlm.version": (meta.get("versions") or {}).get("nlm"),
    }
    metrics = {k: float(v) for k, v in (meta.get("final_metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    export_path = model_dir / EXPORT_METADATA_FILE
    if export_path.is_file():
        export = json.loads(export_path.read_text(encoding="utf-8"))
        tags["nlm.export_format"] = export.get("format")
        tags["nlm.export_source"] = export.get("source")
        quality = (export.get("quality") or {}).get("export") or {}
        metrics.update({f"export_{k}": float(v) for k, v in quality.items() if isinstance(v, (int, float))})
        if (export.get("sizes") or {}).get("export_bytes"):
            metrics["export_bytes"] = float(export["sizes"]["export_bytes"])
    clean = lambda d: {k: str(v)[:5000] for k, v in d.items() if v is not None}  # noqa: E731
    return clean(params), clean(tags), metrics


def _client(tracking_uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError("nlm publish needs MLflow: run `pip install mlflow-skinny sqlalchemy alembic` "
                          "(or: pip install -e '.[export]' in the nlm checkout)") from None
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store live next to it (MLflow's default is ./mlruns in the cwd)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
        return (db.parent.resolve() / f"{db.stem}-artifacts").as_uri()
    return None


def _experiment_id(client: Any, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=_artifact_location(tracking_uri))


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("--tracking_uri is required (or set MLFLOW_TRACKING_URI), e.g. sqlite:///mlflow.db "
                          "or http://mlflow-server:5000")
    return uri


def publish_model(
    model: str | Path,
    name: str,
    *,
    tracking_uri: str | None = None,
    alias: str | None = None,
    only_if_better: str | None = None,
) -> PublishResult:
    """Register `model` as a new version of `name`; point `alias` at it (if asked, only when it improves)."""
    from mlflow.exceptions import MlflowException

    model_dir = resolve_model_dir(model)
    if only_if_better and not alias:
        raise ConfigError("--only_if_better needs --alias (the alias it would move)")
    params, tags, metrics = lineage(model_dir)
    if only_if_better and only_if_better not in metrics:
        known = ", ".join(sorted(metrics)) or "none (the folder has no eval metrics in its metadata)"
        raise ConfigError(f"--only_if_better {only_if_better}: not among this model's metrics: {known}")
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    try:
        run = client.create_run(_experiment_id(client, uri), run_name=f"publish-{name}", tags=tags)
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.log_artifacts(run_id, str(model_dir), "model")
        client.set_terminated(run_id)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="published by nlm")
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                              tags={**tags, **{f"metric.{k}": str(v) for k, v in metrics.items()}})
        moved, reason = False, "no alias asked"
        if alias:
            moved, reason = _alias_decision(client, name, alias, only_if_better, metrics)
            if moved:
                client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise ConfigError(f"MLflow at {uri}: {str(exc).splitlines()[0][:300]}") from None
    logger.info("registered %s version %s (run %s)%s", name, version.version, run_id,
                f"; alias {alias}: {reason}" if alias else "")
    return PublishResult(name=name, version=str(version.version), run_id=run_id, alias=alias, alias_moved=moved,
                         reason=reason)


def _alias_decision(client: Any, name: str, alias: str, metric: str | None, metrics: dict[str, float]) -> tuple[bool, str]:
    from mlflow.exceptions import MlflowException

    if not metric:
        return True, "moved (no --only_if_better)"
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"moved ({alias} did not exist)"
    old = current.tags.get(f"metric.{metric}")
    if old is None:
        return True, f"moved (version {current.version} has no {metric})"
    new, old_value = metrics[metric], float(old)
    better = new < old_value if lower_is_better(metric) else new > old_value
    verdict = "moved" if better else "kept"
    return better, f"{verdict}: {metric} {new:.6g} vs {old_value:.6g} of version {current.version}"


def download_registered_model(model_uri: str, tracking_uri: str, destination: str | Path | None = None) -> Path:
    """The files of `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) in a local folder nlm's loaders read."""
    import mlflow

    _client(tracking_uri)  # the install check
    mlflow.set_registry_uri(tracking_uri)
    target = str(destination) if destination else tempfile.mkdtemp(prefix="nlm-model-")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=target,
                                                    tracking_uri=tracking_uri))
