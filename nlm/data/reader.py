"""Tolerant JSONL reading: good records stream out, bad lines are skipped, counted and reported by line.

Records come in three formats, detected per line so one file may mix them:
  {"prompt": str, "completion": str}   {"text": str}   {"messages": [{"role": str, "content": str}, ...]}
A reader never holds a file in memory: `iter_records` yields one normalised record at a time.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlm.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
# Past this many warnings per file, further skips are logged at DEBUG; the summary still counts them all.
MAX_SKIP_WARNINGS = 20

FORMATS = ("prompt_completion", "text", "chat")


@dataclass
class ReadStats:
    """What reading found, per file set: line counts, formats, skip reasons and empty fields."""

    lines: int = 0
    valid: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    empty_fields: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "valid": self.valid,
            "skipped": dict(self.skipped),
            "formats": dict(self.formats),
            "empty_fields": self.empty_fields,
        }


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# Fields that say which teacher scores a record (distillation.teacher_mixture: route): `teacher`, else the
# data source's name when a mixture of data sources sets one.
ROUTE_FIELDS = ("teacher", "_source")


def normalise_record(obj: Any, prompts_only: bool = False) -> dict[str, str]:
    """Check one parsed JSON value and return it as a flat record of strings (the dataset's row schema);
    a routing field (`teacher`) is kept when present.
    With `prompts_only` (inputs to generation), {"prompt": str} alone is a record with an empty completion."""
    record = _normalise(obj, prompts_only)
    for name in ROUTE_FIELDS:
        if isinstance(obj.get(name), str):
            record["teacher"] = obj[name]
            break
    return record


def _normalise(obj: Any, prompts_only: bool) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise _Skip("not_object", f"expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise _Skip("wrong_type", "'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise _Skip("wrong_type", f"messages[{i}] must be an object with string 'role' and 'content'")
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return {"format": "chat", "prompt": "", "completion": "", "text": "", "messages": json.dumps(clean)}
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion", "" if prompts_only else None)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _Skip("wrong_type", "'prompt' and 'completion' must both be strings")
        return {"format": "prompt_completion", "prompt": prompt, "completion": completion, "text": "", "messages": ""}
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise _Skip("wrong_type", "'text' must be a string")
        return {"format": "text", "prompt": "", "completion": "", "text": obj["text"], "messages": ""}
    raise _Skip("unknown_format", "expected keys prompt+completion, text, or messages")


def _has_empty_field(record: dict[str, str], prompts_only: bool = False) -> bool:
    if record["format"] == "prompt_completion":
        return not record["prompt"].strip() or (not prompts_only and not record["completion"].strip())
    if record["format"] == "text":
        return not record["text"].strip()
    return any(not m["content"].strip() for m in json.loads(record["messages"]))


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} not found")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise DataError(f"data file {path} is empty: expected JSON lines")


def iter_records(
    paths: Sequence[Path], stats: ReadStats, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, prompts_only: bool = False
) -> Iterator[dict[str, str]]:
    """Yield normalised records from JSONL files, skipping and counting bad lines.

    Raises DataError for a missing, unreadable or empty file, or a file in which no line is usable.
    """
    for _, _, record in iter_numbered_records(paths, stats, max_line_bytes, prompts_only):
        yield record


def iter_numbered_records(
    paths: Sequence[Path], stats: ReadStats, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, prompts_only: bool = False
) -> Iterator[tuple[int, int, dict[str, str]]]:
    """`iter_records` with each record's place: (index of its file in `paths`, 1-based line number)."""
    for path in paths:
        _check_readable(path)
    for file_index, path in enumerate(paths):
        valid_before, warned = stats.valid, 0
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue  # blank lines (and a trailing newline) are not records
                stats.lines += 1
                try:
                    record = _parse_line(raw, max_line_bytes, prompts_only)
                except _Skip as skip:
                    stats.skipped[skip.reason] += 1
                    level = logging.WARNING if warned < MAX_SKIP_WARNINGS else logging.DEBUG
                    warned += 1
                    logger.log(level, "%s line %d skipped (%s): %s", path, number, skip.reason, skip)
                    if warned == MAX_SKIP_WARNINGS:
                        logger.warning("%s: further skipped lines are logged at DEBUG only", path)
                    continue
                stats.valid += 1
                stats.formats[record["format"]] += 1
                if _has_empty_field(record, prompts_only):
                    stats.empty_fields += 1
                yield file_index, number, record
        if stats.valid == valid_before:
            raise DataError(f"data file {path}: none of its lines is a usable record ({_reasons(stats)})")
    if stats.skipped:
        logger.warning("skipped %d of %d lines: %s", sum(stats.skipped.values()), stats.lines, _reasons(stats))
    if stats.empty_fields:
        logger.warning("%d records have an empty prompt, completion, text or message", stats.empty_fields)


def _reasons(stats: ReadStats) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(stats.skipped.items())) or "no lines"


def _parse_line(raw: bytes, max_line_bytes: int, prompts_only: bool = False) -> dict[str, str]:
    if len(raw) > max_line_bytes:
        raise _Skip("too_large", f"{len(raw)} bytes, more than the {max_line_bytes}-byte cap")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Skip("invalid_utf8", f"byte {exc.start} is not valid UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Skip("invalid_json", f"{exc.msg} at column {exc.colno}") from None
    return normalise_record(obj, prompts_only)


def load_records(paths: Sequence[Path], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[dict], ReadStats]:
    """Read small files whole (evaluation, inspection of tests); training streams with `iter_records`."""
    stats = ReadStats()
    records = list(iter_records(paths, stats, max_line_bytes))
    return records, stats
