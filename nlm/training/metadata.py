"""training_metadata.json: what produced a model, enough to reproduce or audit it. Secrets are never written."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import nlm
from nlm.config.settings import TrainingConfig


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"nlm": nlm.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the working directory's repository, when there is one (the user's project, usually)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def redacted_config(config: TrainingConfig) -> dict[str, Any]:
    """The effective config as JSON-able values; SecretStr fields dump as '**********'."""
    return config.model_dump(mode="json")


def write_metadata(path: Path, **fields: Any) -> Path:
    document = {"versions": package_versions(), "git_commit": git_commit(), **fields}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return path
