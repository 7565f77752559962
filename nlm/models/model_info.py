"""What a trained model's folder says about how it was trained (read from its metadata file, if any)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METADATA_FILE = "training_metadata.json"  # written by nlm.training, read by inference: one owner of the name


def training_metadata(model_path: str | Path) -> dict[str, Any]:
    path = Path(model_path) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def prompt_separator(model_path: str | Path, default: str = "\n") -> str:
    """The text nlm put between prompt and completion when training this model."""
    return training_metadata(model_path).get("config", {}).get("prompt_separator", default)
