"""The export folder: created fresh, or replaced with --overwrite only when nlm wrote everything in it.

(Interim helper until the project-wide run-folder markers land: an export folder is recognised by its
export_metadata.json, which lists every file the export wrote; nothing else is ever deleted.)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from nlm.config.paths import safe_output_dir
from nlm.errors import RunExistsError

logger = logging.getLogger(__name__)

EXPORT_METADATA_FILE = "export_metadata.json"


def prepare_export_dir(path: str | Path, overwrite: bool) -> Path:
    """`path` resolved and empty (created if missing). A non-empty folder needs --overwrite, and then every
    entry in it must be one a previous `nlm export` listed in its export_metadata.json."""
    folder = safe_output_dir(path)
    if folder.exists() and not folder.is_dir():
        raise RunExistsError(f"--output {path} is a file, not a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries:
        if not overwrite:
            raise RunExistsError(f"--output {folder} is not empty ({len(entries)} entries); choose a new folder "
                                 "or pass --overwrite to replace an earlier export")
        written = _files_of_earlier_export(folder)
        foreign = [name for name in entries if name not in written]
        if foreign:
            raise RunExistsError(f"--overwrite: {folder} holds files nlm did not write ({', '.join(foreign[:5])}); "
                                 "refusing to delete them: choose another --output")
        logger.warning("--overwrite: replacing the earlier export in %s", folder)
        for name in entries:
            target = folder / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _files_of_earlier_export(folder: Path) -> set[str]:
    try:
        metadata = json.loads((folder / EXPORT_METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(metadata.get("files", [])) | {EXPORT_METADATA_FILE}
