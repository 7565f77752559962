"""What a run folder was started with: its effective settings, the content hashes of its data and its models.

`nlm train` writes it into a new run folder (`run_fingerprint.json`). `--resume` compares it with the run's
own: other data or other models are refused by name (a checkpoint trained on them is another run); changed
settings (a new learning rate is a legitimate resume) are allowed, logged and recorded in
training_metadata.json. The SageMaker `train` entry point reuses a work folder only when the whole
fingerprint matches (a restarted job); any other job starts fresh there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nlm.config.dotted import flatten
from nlm.config.settings import TrainingConfig

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
# Where and how a run is launched, not what it trains.
LAUNCH_KEYS = {"output_dir", "resume", "overwrite", "hf_token"}


def run_fingerprint(config: TrainingConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{"settings": the effective options, "data": [[source, sha256 of each file], ...], "models": {...}}.

    Data and models are identified by content (SHA-256 of the files; a hub model by id and revision), not
    by path: a restarted SageMaker job downloads its channels to the same paths with new times."""
    from nlm.data.files import file_sha256, resolve_eval_files, resolve_train_files
    from nlm.data.mixture import source_files
    from nlm.distill.cache import weights_fingerprint
    from nlm.distill.teacher_loading import teacher_specs

    if config.train_mixture:
        sources = [(source.label, source_files(i, source.path, source.name, environ))
                   for i, source in enumerate(config.train_mixture)]
    else:
        sources = [("train", resolve_train_files(config.train_file, environ))]
    sources.append(("eval", resolve_eval_files(config.eval_file, environ)))
    data = [[name, [file_sha256(path) for path in files]] for name, files in sources]
    models: dict[str, Any] = {"student": weights_fingerprint(config.student_model, config.student_revision)}
    if config.teacher_cache:
        manifest = Path(config.teacher_cache) / "manifest.json"
        models["teacher_cache"] = file_sha256(manifest) if manifest.is_file() else str(config.teacher_cache)
    else:
        models["teachers"] = [weights_fingerprint(spec.model, spec.revision) for spec in teacher_specs(config)]
    settings = config.model_dump(mode="json", exclude=LAUNCH_KEYS)
    return {"settings": settings, "data": data, "models": models}


def write_fingerprint(run_dir: Path, fingerprint: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / FINGERPRINT_FILE
    path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """The fingerprint a run folder was started with; None when it has none (or an unreadable one)."""
    try:
        found = json.loads((Path(run_dir) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and {"settings", "data", "models"} <= set(found) else None


def changed_settings(before: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{dotted option: [value the run started with, value now]} for every option that differs."""
    old, new = flatten(before["settings"]), flatten(now["settings"])
    return {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def changed_inputs(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What makes `now` another run than `before`: 'data (train)', 'student model', ... (empty when the same)."""
    found = []
    old_data, new_data = dict(map(tuple, before["data"])), dict(map(tuple, now["data"]))
    for name in sorted(set(old_data) | set(new_data)):
        if old_data.get(name) != new_data.get(name):
            found.append(f"data ({name})")
    for key in sorted(set(before["models"]) | set(now["models"])):
        if before["models"].get(key) != now["models"].get(key):
            found.append({"student": "student model", "teachers": "teacher model", "teacher_cache": "teacher cache"}
                         .get(key, key))
    return found


def check_resume(run_dir: Path, fingerprint: Mapping[str, Any]) -> dict[str, list[Any]]:
    """For `--resume`: refuse other data or models (RunExistsError, exit 2, naming them); return the changed
    settings (logged) so the run's metadata records them. A run folder from before fingerprints resumes as
    it did, with a warning."""
    from nlm.errors import RunExistsError

    started = read_fingerprint(run_dir)
    if started is None:
        logger.warning("--resume: %s has no %s (started by an older nlm): its data and models cannot be checked",
                       run_dir, FINGERPRINT_FILE)
        return {}
    others = changed_inputs(started, fingerprint)
    if others:
        raise RunExistsError(f"--resume: {run_dir} was started with other {', '.join(others)} than this run's; a "
                             "checkpoint trained on them belongs to another run: choose another --run_name, or "
                             "--overwrite to start this one afresh")
    changes = changed_settings(started, fingerprint)
    for key, (old, new) in changes.items():
        logger.warning("--resume with a changed setting: %s %r -> %r", key, old, new)
    return changes


def record_fingerprint(config: TrainingConfig, run_dir: Path, resuming: bool) -> dict[str, list[Any]]:
    """`nlm train`'s one call: a new run folder gets the fingerprint; a resumed one is checked against it
    (returns the changed settings for the metadata)."""
    fingerprint = run_fingerprint(config)
    if resuming:
        return check_resume(run_dir, fingerprint)
    write_fingerprint(run_dir, fingerprint)
    return {}
