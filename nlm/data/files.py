"""Which files hold the training and evaluation data: explicit paths first, then SageMaker channels."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from nlm.errors import DataError

TRAIN_CHANNELS = ("SM_CHANNEL_TRAIN",)
EVAL_CHANNELS = ("SM_CHANNEL_EVAL", "SM_CHANNEL_VALIDATION", "SM_CHANNEL_TEST")


def check_data_file(path: Path | str, option: str) -> Path:
    """A data file the user named must exist, be a file and be readable; else a DataError (exit 2) naming the
    option it came from. Commands call this before loading any model."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path}: is a directory, expected a JSONL file")
    if not path.exists():
        raise DataError(f"{option} {path}: file not found")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"{option} {path}: cannot be read ({exc.strerror or exc})") from None
    return path


def _channel_files(variable: str, directory: str) -> list[Path]:
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(f"${variable} is {directory}, which is not a directory")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise DataError(f"${variable} directory {directory} holds no *.jsonl file")
    return files


def _from_channels(explicit: Path | None, channels: tuple[str, ...], environ: Mapping[str, str] | None,
                   option: str) -> list[Path]:
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return [check_data_file(explicit, option)]
    for variable in channels:
        if environ.get(variable):
            return _channel_files(variable, environ[variable])
    return []


def resolve_train_files(train_file: Path | None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """`train_file` if given, else every *.jsonl (sorted) in $SM_CHANNEL_TRAIN."""
    files = _from_channels(train_file, TRAIN_CHANNELS, environ, "--train_file")
    if not files:
        raise DataError("no training data: set train_file (--train_file FILE) or $SM_CHANNEL_TRAIN to a folder of *.jsonl")
    return files


def resolve_eval_files(eval_file: Path | None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """`eval_file` if given, else $SM_CHANNEL_EVAL, $SM_CHANNEL_VALIDATION or $SM_CHANNEL_TEST, else none (empty list)."""
    return _from_channels(eval_file, EVAL_CHANNELS, environ, "--eval_file")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content; remembered per (path, size, mtime), since a run hashes its data files
    for the tokenisation cache, the teacher-cache check and the metadata."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def files_fingerprint(paths: Sequence[Path]) -> dict[str, str]:
    """Content hash of each data file, by path: the cache key and the run metadata use it."""
    return {str(path): file_sha256(path) for path in paths}
