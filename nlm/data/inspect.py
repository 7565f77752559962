"""`nlm data inspect`: what a JSONL file holds, and how it would tokenise, before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nlm.data.reader import DEFAULT_MAX_LINE_BYTES, ReadStats, iter_records
from nlm.data.tokenize import TokenizeSettings, encode_chat, encode_prompt_completions, encode_texts


def inspect_file(
    path: Path, tokenizer: Any | None = None, settings: TokenizeSettings | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> dict[str, Any]:
    """Counts of lines, valid records by format and skips by reason; token-length percentiles with a tokenizer."""
    import json

    settings = settings or TokenizeSettings()
    stats = ReadStats()
    lengths: list[int] = []
    for record in iter_records([Path(path)], stats, max_line_bytes):
        if tokenizer is None:
            continue
        if record["format"] == "prompt_completion":
            ids, _ = encode_prompt_completions(tokenizer, [record["prompt"]], [record["completion"]], settings)[0]
        elif record["format"] == "text":
            ids, _ = encode_texts(tokenizer, [record["text"]])[0]
        elif getattr(tokenizer, "chat_template", None):
            ids, _ = encode_chat(tokenizer, json.loads(record["messages"]), settings)
        else:
            continue
        lengths.append(len(ids))
    report = stats.as_dict()
    if lengths:
        lengths.sort()
        report["tokens"] = {
            f"p{q}": lengths[min(len(lengths) - 1, int(round(q / 100 * (len(lengths) - 1))))] for q in (50, 90, 95, 99)
        }
        report["tokens"]["max"] = lengths[-1]
        report["tokens"]["max_seq_length"] = settings.max_seq_length
        report["would_truncate"] = sum(1 for n in lengths if n > settings.max_seq_length)
    return report


def format_report(path: Path, report: dict[str, Any]) -> str:
    lines = [f"{path}", f"  lines:   {report['lines']}", f"  valid:   {report['valid']}"]
    for name, count in sorted(report["formats"].items()):
        lines.append(f"    {name}: {count}")
    lines.append(f"  skipped: {sum(report['skipped'].values())}")
    for reason, count in sorted(report["skipped"].items()):
        lines.append(f"    {reason}: {count}")
    lines.append(f"  records with an empty field: {report['empty_fields']}")
    if "tokens" in report:
        t = report["tokens"]
        lines.append(f"  tokens:  p50 {t['p50']}  p90 {t['p90']}  p95 {t['p95']}  p99 {t['p99']}  max {t['max']}")
        lines.append(f"  would be truncated at max_seq_length={t['max_seq_length']}: {report['would_truncate']}")
    return "\n".join(lines)


def inspect_sources(specs: list[tuple[str, float, list[Path]]], tokenizer: Any | None = None,
                    settings: TokenizeSettings | None = None) -> dict[str, Any]:
    """Per-source counts of a training mixture: (name, weight, files) -> the file report summed per source,
    with the weight and the sampling probability it stands for."""
    total = sum(weight for _, weight, _ in specs)
    sources = []
    for name, weight, files in specs:
        reports = [inspect_file(path, tokenizer, settings) for path in files]
        sources.append({
            "name": name, "weight": weight, "probability": round(weight / total, 6), "files": [str(p) for p in files],
            "lines": sum(r["lines"] for r in reports), "valid": sum(r["valid"] for r in reports),
            "skipped": sum(sum(r["skipped"].values()) for r in reports),
        })
    return {"sources": sources, "valid": sum(s["valid"] for s in sources)}


def format_sources(report: dict[str, Any]) -> str:
    lines = [f"{'source':<20} {'weight':>8} {'p':>7} {'records':>9} {'skipped':>8}  files"]
    for s in report["sources"]:
        lines.append(f"{s['name']:<20} {s['weight']:>8g} {s['probability']:>7.3f} {s['valid']:>9} {s['skipped']:>8}  "
                     + ", ".join(s["files"]))
    return "\n".join(lines)
