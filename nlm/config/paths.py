"""Where nlm may write and what it may delete.

Never into system directories; only inside the run's output directory; and `--overwrite` deletes only
folders nlm created (marked with `.nlm-folder.json`) and, inside them, only what nlm wrote — sub-folders
included; a one-file output is replaced only when nlm noted it had written it (`.nlm-files.json`).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlm.errors import FolderNotOwnedError, RunExistsError, UnsafePathError

logger = logging.getLogger(__name__)

# Writing below these would damage the machine; nlm refuses them whatever the user's rights.
SYSTEM_DIRECTORIES = (
    "/etc", "/sys", "/proc", "/root", "/boot", "/dev", "/bin", "/sbin", "/usr", "/lib", "/lib64", "/var/lib",
)  # fmt: skip


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def safe_output_dir(path: Path | str) -> Path:
    """Resolve `path` (symlinks and `..` included) and refuse it when it lies in a system directory."""
    resolved = Path(path).expanduser().resolve()
    for system_dir in SYSTEM_DIRECTORIES:
        system_path = Path(system_dir)
        # Compare with both the literal and the resolved form: /lib is a link to /usr/lib on many systems.
        if _is_within(resolved, system_path) or _is_within(resolved, system_path.resolve()):
            raise UnsafePathError(
                f"output path {path} resolves to {resolved}, inside the system directory {system_dir}; "
                "choose a folder under your home or project directory"
            )
    return resolved


def path_inside(base: Path, relative: Path | str) -> Path:
    """Join `relative` onto `base` and refuse the result if it escapes `base` (via `..` or a symlink)."""
    root = safe_output_dir(base)
    candidate = (root / relative).resolve()
    if not _is_within(candidate, root):
        raise UnsafePathError(f"refusing to write {relative}: it resolves to {candidate}, outside {root}")
    return candidate


def output_path_check(value: Any) -> Any:
    """For a command's `Options`: `field_validator("output")(staticmethod(output_path_check))` refuses a
    system path when the options are parsed (exit 2, before any model loads), as `output_dir` is for training."""
    if value is not None:
        try:
            safe_output_dir(value)
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None
    return value


# --- Folders nlm owns ---------------------------------------------------------------------------------
# Every folder nlm creates holds this marker: which command created it and which entries inside it are
# nlm's (glob patterns). `--overwrite` removes only marked folders, and inside them only those entries:
# anything else (a user's notes, a dataset copied in by hand) is kept and reported.

MARKER = ".nlm-folder.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of `folder`, or None when nlm did not create it (or the marker is unreadable)."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("owns"), list) else None


def mark_folder(folder: Path, created_by: str, owns: Sequence[str]) -> Path:
    """Create `folder` (parents too) and mark it as nlm's; an existing marker is kept as it is, and a
    non-empty folder without one is never claimed (nlm did not create it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if read_marker(folder) is None and not any(entry.name != MARKER for entry in folder.iterdir()):
        marker = {"created_by": created_by, "owns": list(owns), "nlm_version": _version(),
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        partial = folder / (MARKER + ".partial")
        partial.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, folder / MARKER)
    return folder


def describe_contents(folder: Path, shown: int = 3) -> str:
    """A few entry names of `folder` for a one-line message: 'thesis.txt, notes/ and 2 more'."""
    names = sorted(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "") for entry in Path(folder).iterdir())
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def refuse_protected(folder: Path) -> None:
    """Whatever its marker, never empty `/`, the home folder, or a folder that holds the current directory."""
    resolved = Path(folder).resolve()
    if resolved == Path(resolved.anchor):
        raise UnsafePathError(f"refusing to delete anything in {folder}: it is the filesystem root")
    if resolved == Path.home().resolve():
        raise UnsafePathError(f"refusing to delete anything in {folder}: it is your home folder")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        raise UnsafePathError(f"refusing to delete anything in {folder}: it contains the current directory {cwd}")


def require_owned(folder: Path) -> dict[str, Any]:
    """The marker of a non-empty `folder`; a FolderNotOwnedError (exit 2) naming what it holds if there is none."""
    marker = read_marker(folder)
    if marker is None:
        raise FolderNotOwnedError(
            f"{folder} is not empty and was not created by nlm (it holds {describe_contents(folder)}); nlm never "
            "replaces such a folder, even with --overwrite: choose another folder or move its files away"
        )
    return marker


# Files transformers, PEFT, datasets and TensorBoard write in the folders nlm owns (checkpoint-N/, runs/,
# and output written by an nlm older than the per-folder markers). Inside an owned folder that has no marker
# of its own, only these are removed; anything else is kept and named.
RECOGNISED_FILES = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json", "adapter_config.json",
    "training_metadata.json", "export_metadata.json", "distill_projections.safetensors", "trainer_state.json",
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "events.out.tfevents.*", "*.arrow", "dataset_info.json", "state.json", "dataset_dict.json", "stats.json", "*.partial",
    "latest", "zero_to_fp32.py", "global_step*", "pytorch_model_fsdp*", "optimizer_*", "model_*",
)  # fmt: skip


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()  # a file, or a link (removed, never followed)


def _clear_recognised(folder: Path) -> list[str]:
    """Inside an owned folder without a marker: remove the files nlm's libraries write (RECOGNISED_FILES),
    recurse into sub-folders, keep the rest. Returns what was kept; the folder goes when nothing is."""
    kept: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and read_marker(entry) is not None:
            inside = clear_owned(entry)
            if not inside:
                (entry / MARKER).unlink()
                entry.rmdir()
            kept += [f"{entry.name}/{name}" for name in inside]
        elif entry.is_dir() and not entry.is_symlink():
            kept += [f"{entry.name}/{name}" for name in _clear_recognised(entry)]
        elif any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in RECOGNISED_FILES):
            entry.unlink()
        else:
            kept.append(entry.name)
    if not kept and folder.exists():
        folder.rmdir()
    return kept


def clear_owned(folder: Path) -> list[str]:
    """Remove what nlm wrote in the marked `folder`, keep everything else; returns the kept entries (paths
    relative to `folder`).

    An owned entry that is a folder is never removed whole: with a marker of its own it is cleared by that
    marker, without one only the files nlm's libraries write there are removed (RECOGNISED_FILES). A folder
    left empty goes; `folder` itself and its marker stay.
    """
    folder = Path(folder)
    refuse_protected(folder)
    owns = require_owned(folder)["owns"]
    kept: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name == MARKER:
            continue
        owned = any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in owns)
        if entry.is_dir() and not entry.is_symlink() and read_marker(entry) is not None:
            inside = clear_owned(entry)
            if inside:
                kept += [f"{entry.name}/{name}" for name in inside]
            else:
                (entry / MARKER).unlink()
                entry.rmdir()
        elif owned and entry.is_dir() and not entry.is_symlink():
            kept += [f"{entry.name}/{name}" for name in _clear_recognised(entry)]
        elif owned:
            _remove(entry)
        else:
            kept.append(entry.name)
    return kept


def record_written(folder: Path | str, created_by: str, before: Sequence[str] = ()) -> Path:
    """After nlm wrote into `folder`: mark it (or extend its marker) so that it owns every entry that is there
    now and was not in `before` (the names listed before writing). `--overwrite` then removes exactly those."""
    folder = Path(folder)
    marker = read_marker(folder)
    new = sorted(glob.escape(entry.name) for entry in folder.iterdir()
                 if entry.name != MARKER and entry.name not in set(before))
    if marker is None:
        marker = {"created_by": created_by, "owns": [], "nlm_version": _version(),
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    marker["owns"] = list(dict.fromkeys([*marker["owns"], *new]))
    partial = folder / (MARKER + ".partial")
    partial.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, folder / MARKER)
    return folder


def claim_folder(folder: Path | str, *, created_by: str, owns: Sequence[str], overwrite: bool,
                 exists_message: str) -> Path:
    """The one way a command takes a whole output folder: checked, emptied of nlm's earlier output on
    `overwrite`, created and marked. An existing non-empty folder raises RunExistsError(`exists_message`)
    without `overwrite`, and FolderNotOwnedError when nlm did not create it."""
    root = safe_output_dir(folder)
    if root.exists() and not root.is_dir():
        raise UnsafePathError(f"{folder} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()):
        require_owned(root)
        if not overwrite:
            raise RunExistsError(exists_message)
        kept = clear_owned(root)
        if kept:
            logger.warning("--overwrite kept %s in %s: nlm did not write them", ", ".join(kept), root)
        else:
            logger.info("--overwrite: removed the earlier output in %s", root)
    return mark_folder(root, created_by, owns)


def _version() -> str:
    from nlm import __version__

    return __version__


# --- Files nlm writes into folders it does not own ------------------------------------------------------
# A command whose output is one file (`teacher-generate`, `data select`, `data mix`) may be pointed into any
# folder. It records the file in `.nlm-files.json` next to it, and replaces (`--overwrite`) only a file so
# recorded: a user's file of the same name is never replaced.

FILES_RECORD = ".nlm-files.json"


def _files_record(folder: Path) -> dict[str, Any]:
    path = folder / FILES_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else {}
    except (OSError, ValueError):
        record = {}
    return record if isinstance(record.get("files"), dict) else {"files": {}}


def written_by_nlm(path: Path | str) -> bool:
    """Whether nlm wrote the file at `path`: recorded next to it, or owned by the marker of its folder."""
    path = Path(path)
    marker = read_marker(path.parent)
    if marker is not None and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in marker["owns"]):
        return True
    return path.name in _files_record(path.parent)["files"]


def record_file(path: Path | str, created_by: str) -> None:
    """Note that nlm wrote the file at `path` (after writing it), so a later `--overwrite` may replace it."""
    path = Path(path)
    record = _files_record(path.parent)
    record["files"][path.name] = {"created_by": created_by,
                                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    partial = path.parent / (FILES_RECORD + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path.parent / FILES_RECORD)


def claim_file(path: Path | str, *, overwrite: bool, option: str = "--output", resumable: bool = False) -> Path:
    """The one way a command takes an output file: checked (system paths, a folder in the way), and an
    existing file only when nlm wrote it — replaced with `overwrite`, or kept for a `resumable` command to
    continue; otherwise RunExistsError, or FolderNotOwnedError when nlm did not write it."""
    resolved = safe_output_dir(path)
    if resolved.is_dir():
        raise UnsafePathError(f"{option} {path} is a folder, expected a file")
    if resolved.exists() or resolved.is_symlink():
        if not written_by_nlm(resolved):
            raise FolderNotOwnedError(
                f"{option} {path} already exists and was not written by nlm; nlm never replaces such a file, even "
                "with --overwrite: choose another path or move the file away")
        if not overwrite and not resumable:
            raise RunExistsError(f"{option} {path} already exists (written by nlm earlier); pass --overwrite to "
                                 "replace it")
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return resolved
