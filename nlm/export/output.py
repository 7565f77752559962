"""The export folder: one nlm owns (marked, as every output folder), created fresh or, with --overwrite, emptied
of what an earlier export wrote there; a user's files in it are kept.

An export written before the markers existed is recognised by its export_metadata.json, which lists every
file that export wrote: it is adopted (marked with exactly those files) so that --overwrite can replace it.
"""

from __future__ import annotations

import json
from pathlib import Path

from nlm.config.paths import claim_folder, read_marker, record_written, safe_output_dir

EXPORT_METADATA_FILE = "export_metadata.json"


def prepare_export_dir(path: str | Path, overwrite: bool) -> Path:
    """`path` resolved, created and marked as nlm's. A non-empty folder needs --overwrite and an nlm marker
    (or an earlier export's metadata); then only the earlier export's files are removed."""
    folder = safe_output_dir(path)
    if folder.is_dir() and read_marker(folder) is None and (folder / EXPORT_METADATA_FILE).is_file():
        written = _files_of_earlier_export(folder)
        record_written(folder, "nlm export", before=[p.name for p in folder.iterdir() if p.name not in written])
    return claim_folder(folder, created_by="nlm export", owns=("*.partial", ".nlm-staging-*"), overwrite=overwrite,
                        exists_message=f"--output {folder} already holds an export; choose a new folder or pass "
                                       "--overwrite to replace it")


def _files_of_earlier_export(folder: Path) -> set[str]:
    try:
        metadata = json.loads((folder / EXPORT_METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(metadata.get("files", [])) | {EXPORT_METADATA_FILE}
