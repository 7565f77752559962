"""Active learning: score a pool of records with a teacher and a student, keep the most uncertain ones.

One batched scoring pass (`nlm.distill.scoring`) over the pool; records are written verbatim. A pool of
prompts without completions is scored on the student's own greedy answer, which the teacher then scores.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlm.data.mixture import record_reader
from nlm.data.reader import ReadStats, iter_numbered_records
from nlm.data.select import selection_size, top_indices
from nlm.data.tokenize import TokenizeSettings, encode_chat, encode_prompt_completions, encode_texts
from nlm.distill.scoring import score_examples
from nlm.errors import ConfigError

logger = logging.getLogger(__name__)

CRITERIA = ("disagreement", "teacher_student_kl", "student_entropy", "teacher_entropy")


@dataclass
class Selection:
    lines: list[int]  # pool line numbers kept, best first
    scored: int  # pool records scored
    generated: int  # prompt-only records answered by the student


def _text(record: dict[str, str]) -> str:
    return record["prompt"] + " " + record["completion"] if record["format"] == "prompt_completion" else (
        record["text"] or record["messages"])


def select_from_pool(
    pool: Path, teacher: Any, student: Any, tokenizer: Any, *, by: str, output: Path, fraction: float | None = None,
    count: int | None = None, scores_file: Path | None = None, diverse: bool = False,
    settings: TokenizeSettings | None = None, batch_size: int = 8, max_new_tokens: int = 64, vocab_width: int | None = None,
) -> Selection:
    """Score every record of `pool`, write the top ones (verbatim) to `output` and, if asked, every score."""
    if by not in CRITERIA:
        raise ConfigError(f"--by {by!r}: expected one of {', '.join(CRITERIA)}")
    settings = settings or TokenizeSettings()
    stats = ReadStats()
    records = [(line, record) for _, line, record in iter_numbered_records([pool], stats, settings.max_line_bytes, prompts_only=True)]
    generated = _answer_prompts(records, student, tokenizer, batch_size, max_new_tokens, settings.prompt_separator)
    examples, kept = [], []
    for line, record in records:
        ids, labels = _encode(record, tokenizer, settings)
        ids, labels = ids[: settings.max_seq_length], labels[: settings.max_seq_length]
        if any(label != -100 for label in labels[1:]):
            examples.append({"input_ids": ids, "labels": labels})
            kept.append((line, record))
    if not examples:
        raise ConfigError(f"--data {pool}: no record has a completion token to score")
    size = selection_size(len(examples), fraction, count)
    width = vocab_width or len(tokenizer)
    scores = score_examples(examples, student=student, teacher=teacher, vocab_width=width,
                            pad_token_id=tokenizer.pad_token_id or 0, batch_size=batch_size)
    order = top_indices(scores[by], size, [_text(r) for _, r in kept] if diverse else None)
    lines = [kept[i][0] for i in order]
    read = record_reader([pool])
    try:
        _write_jsonl(output, (read(0, line) for line in lines))
    finally:
        read.close()
    if scores_file is not None:
        chosen = set(order)
        _write_jsonl(scores_file, (
            {"line": kept[i][0], "score": float(scores[by][i]), "selected": i in chosen,
             **{name: float(scores[name][i]) for name in CRITERIA}, "tokens": int(scores["tokens"][i]),
             **({"student_answer": kept[i][1]["completion"]} if kept[i][1].get("_generated") else {})}
            for i in range(len(kept))))
    logger.info("kept %d of %d pool records by %s%s", len(lines), len(kept), by, " (diverse)" if diverse else "")
    return Selection(lines=lines, scored=len(kept), generated=generated)


def _encode(record: dict[str, str], tokenizer: Any, settings: TokenizeSettings) -> tuple[list[int], list[int]]:
    if record["format"] == "prompt_completion":
        return encode_prompt_completions(tokenizer, [record["prompt"]], [record["completion"]], settings)[0]
    if record["format"] == "text":
        return encode_texts(tokenizer, [record["text"]])[0]
    return encode_chat(tokenizer, json.loads(record["messages"]), settings)


def _answer_prompts(records: list[tuple[int, dict]], student: Any, tokenizer: Any, batch_size: int, max_new_tokens: int,
                    separator: str) -> int:
    """Fill in the student's greedy answer where a record has a prompt and no completion."""
    from nlm.models.generation import GenerationSettings, generate_texts

    todo = [record for _, record in records if record["format"] == "prompt_completion" and not record["completion"].strip()]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    side = tokenizer.padding_side
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = generate_texts(student, tokenizer, [r["prompt"] + separator for r in chunk], settings)
            for record, answer in zip(chunk, answers, strict=True):
                record["completion"], record["_generated"] = answer[0], "1"
    finally:
        tokenizer.padding_side = side
    if todo:
        logger.info("%d prompt-only records: scored on the student's greedy answers", len(todo))
    return len(todo)


def _write_jsonl(path: Path, rows: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
