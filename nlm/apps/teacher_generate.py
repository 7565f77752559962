"""Offline sequence-level KD (Kim & Rush 2016) and data synthesis: the teacher writes completions for prompts.

prompts JSONL -> OUT.jsonl, K records per valid prompt, in input order:
  {"prompt": p} or {"prompt": p, "completion": c}  -> {"prompt": p, "completion": <teacher's>}
  {"text": t}                                        -> {"prompt": t, "completion": <teacher's>}
  {"messages": [..., user]} (trailing assistant turns are dropped and rewritten)
                                                     -> {"messages": [..., user, {"role": "assistant", ...}]}
Prompts are tokenised exactly as `nlm train` tokenises them (prompt + prompt_separator with the tokenizer's
special tokens; chat through the template), so the output trains with `nlm train --train_file OUT.jsonl`.

Resumable: after each batch the records are flushed and a small state file OUT.jsonl.progress.json records
how many prompts and bytes are done; a rerun with the same input and settings truncates any partly written
batch and continues (batch seeds depend on the batch's position, so the result is the same as one run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nlm.config.paths import claim_file, record_file
from nlm.data.files import files_fingerprint
from nlm.data.reader import ReadStats, iter_records
from nlm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PROGRESS_SUFFIX = ".progress.json"


@dataclass(frozen=True)
class TeacherGenerateSettings:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    batch_size: int = 16
    seed: int = 0
    prompt_separator: str = "\n"


@dataclass
class TeacherGenerateReport:
    output: Path
    prompts: int  # valid prompts in the input
    records: int  # records in the output (prompts x num_return_sequences)
    resumed_at: int  # prompts already done when this call started
    read: dict[str, Any] = field(default_factory=dict)  # the reader's line counts and skip reasons


def prompt_of(record: dict[str, str]) -> tuple[str, Any]:
    """(kind, prompt) of a normalised record: ('chat', messages without trailing assistant turns) or ('text', str)."""
    if record["format"] == "chat":
        messages = json.loads(record["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return "chat", messages
    return "text", record["prompt"] if record["format"] == "prompt_completion" else record["text"]


def _prompt_ids(tokenizer: Any, kind: str, prompt: Any, separator: str) -> list[int]:
    if kind == "chat":
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + separator, add_special_tokens=True)["input_ids"]


def _output_record(kind: str, prompt: Any, completion: str) -> dict[str, Any]:
    if kind == "chat":
        return {"messages": [*prompt, {"role": "assistant", "content": completion}]}
    return {"prompt": prompt, "completion": completion}


def _state_key(data: Path, teacher_model: str, settings: TeacherGenerateSettings) -> str:
    digest = hashlib.sha256(json.dumps({"data": list(files_fingerprint([data]).values()), "teacher": teacher_model,
                                        "settings": asdict(settings)}, sort_keys=True).encode())
    return digest.hexdigest()


def _resume_point(output: Path, progress: Path, key: str, overwrite: bool) -> tuple[int, int]:
    """(prompts done, bytes of output that hold them); 0, 0 for a fresh start. Never replaces or continues a
    file nlm did not write, even when asked."""
    if not progress.is_file():  # a file nlm did not write (no progress, no record) is never replaced or continued
        claim_file(output, overwrite=True, resumable=True)
    if overwrite:
        output.unlink(missing_ok=True)
        progress.unlink(missing_ok=True)
        return 0, 0
    if not output.exists():
        progress.unlink(missing_ok=True)
        return 0, 0
    if not progress.is_file():
        raise ConfigError(f"{output} already exists and holds no teacher-generate progress ({progress.name}), so it "
                          "cannot be continued; pass --overwrite to replace it or choose another --output")
    state = json.loads(progress.read_text())
    if state.get("key") != key:
        raise ConfigError(f"{output} was generated from other data, teacher or settings; pass --overwrite to "
                          "replace it or choose another --output")
    return int(state["prompts_done"]), int(state["bytes"])


def generate_teacher_data(
    teacher_model: str, data: Path, output: Path, settings: TeacherGenerateSettings, *, device: str | None = None,
    overwrite: bool = False, revision: str | None = None, token: Any = None, trust_remote_code: bool = False,
    progress_bar: bool = True,
) -> TeacherGenerateReport:
    """Write the teacher's completions for every valid prompt of `data` to `output` (see the module doc)."""
    from tqdm.auto import tqdm

    from nlm.models.device import resolve_precision, select_device, teacher_dtype
    from nlm.models.loading import freeze, load_causal_lm, load_tokenizer
    from nlm.models.sampling import SamplingSettings, sample_completions, stop_token_ids

    data, output = Path(data), Path(output)
    if output.resolve() == data.resolve():
        raise ConfigError(f"--output {output} is the input file; choose another path")
    read = ReadStats()
    prompts = [prompt_of(record) for record in iter_records([data], read, prompts_only=True)]
    empty = sum(1 for _, prompt in prompts if not prompt)
    if empty:
        logger.warning("%s: %d records have no prompt (empty, or only assistant turns) and were skipped", data, empty)
        read.skipped["no_prompt"] += empty
    prompts = [(kind, prompt) for kind, prompt in prompts if prompt]
    if not prompts:
        raise DataError(f"{data}: no record has a prompt to complete")
    progress = output.with_name(output.name + PROGRESS_SUFFIX)
    key = _state_key(data, teacher_model, settings)
    done, size = _resume_point(output, progress, key, overwrite)
    report = TeacherGenerateReport(output, len(prompts), done * settings.num_return_sequences, done, read.as_dict())
    if done >= len(prompts):
        logger.info("%s is complete (%d prompts); nothing to do", output, done)
        return report

    target = select_device(forced=device) if device else select_device()
    hub = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    tokenizer = load_tokenizer(teacher_model, **hub)
    if any(kind == "chat" for kind, _ in prompts) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{data}: records with 'messages' need a tokenizer with a chat template, and "
                        f"{teacher_model}'s has none")
    model = freeze(load_causal_lm(teacher_model, dtype=teacher_dtype("auto", resolve_precision("auto", target), target),
                                  **hub)).to(target)
    sampling = SamplingSettings(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
                                settings.num_return_sequences)
    stops, pad_id = stop_token_ids(model, tokenizer), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.touch()
    record_file(output, "nlm teacher-generate")
    with output.open("ab") as handle, tqdm(total=len(prompts), initial=done, desc="teacher-generate", unit="prompt",
                                           disable=not progress_bar) as bar:
        handle.truncate(size)  # drop a batch that was being written when an earlier run stopped
        handle.seek(size)
        for start in range(done, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            ids = [_prompt_ids(tokenizer, kind, prompt, settings.prompt_separator) for kind, prompt in batch]
            completions = sample_completions(model, ids, sampling, stop_ids=stops, pad_id=pad_id,
                                             seed=settings.seed + start // settings.batch_size)
            texts = iter(tokenizer.batch_decode(completions, skip_special_tokens=True))
            lines = [json.dumps(_output_record(kind, prompt, next(texts).strip()), ensure_ascii=False)
                     for kind, prompt in batch for _ in range(settings.num_return_sequences)]
            handle.write(("\n".join(lines) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
            done = start + len(batch)
            partial = progress.with_name(progress.name + ".tmp")
            partial.write_text(json.dumps({"key": key, "prompts_done": done, "bytes": size, "total": len(prompts)}))
            partial.replace(progress)
            report.records += len(lines)
            bar.update(len(batch))
    logger.info("teacher-generate: %d records for %d prompts written to %s", report.records, len(prompts), output)
    return report
