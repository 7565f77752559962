"""Records to token ids and label masks, as a Hugging Face `datasets.Dataset` cached on disk.

prompt/completion -> [BOS] prompt + separator | completion + EOS; labels are -100 on the prompt part
                     when `completion_only_loss` is on (the default), so only completion tokens are trained.
text              -> text + EOS, every token a target.
chat (messages)   -> the tokenizer's chat template; only assistant turns are targets.
Prompt and completion are tokenised separately, so the boundary is exact and the prompt's tokens are the
same at training and at generation time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

import nlm
from nlm.config.paths import record_written
from nlm.data.files import files_fingerprint
from nlm.data.paired import PAIRED_COLUMNS, teacher_columns
from nlm.data.reader import DEFAULT_MAX_LINE_BYTES, ReadStats, iter_numbered_records
from nlm.errors import DataError, NlmError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_BATCH = 512  # records tokenised per tokenizer call: fast tokenizers amortise well from a few hundred

# `file` (index into the tokenised paths) and `line` (1-based) give each example a stable key that survives
# skipped lines, re-weighting and re-ordering: curricula read fields by it, `nlm data mix` prints records by it.
FEATURES = datasets.Features(
    {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
     "file": datasets.Value("int32"), "line": datasets.Value("int32")}
)
_LAYOUT = 3  # bump when FEATURES change, so older cached datasets are rebuilt
# With a teacher whose tokenizer differs (distillation.cross_tokenizer): its ids and the aligned positions.
PAIRED_FEATURES = datasets.Features({**FEATURES, **{name: datasets.Sequence(datasets.Value("int32")) for name in PAIRED_COLUMNS}})


@dataclass(frozen=True)
class TokenizeSettings:
    max_seq_length: int = 512
    completion_only_loss: bool = True
    prompt_separator: str = "\n"
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    # Teacher names for route mode: each example gets a `teacher` column, its record's teacher's position.
    route_teachers: tuple[str, ...] = ()


@dataclass
class TokenizeStats:
    read: dict[str, Any] = field(default_factory=dict)
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    target_tokens: int = 0


@dataclass
class TokenizedData:
    dataset: datasets.Dataset
    stats: TokenizeStats
    files: dict[str, str]  # path -> sha256
    cache_hit: bool = False


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything in a tokenizer that changes token ids: vocabulary, merges, normaliser, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def features(settings: TokenizeSettings) -> datasets.Features:
    if not settings.route_teachers:
        return FEATURES
    return datasets.Features({**FEATURES, "teacher": datasets.Value("int32")})


def _route(record: dict[str, str], settings: TokenizeSettings, where: str) -> int:
    """The position of the record's `teacher` among the route names; -1 when the record names none (it is
    then routed by its data source's name, or refused when it has none)."""
    name = record.get("teacher")
    if name is None:
        return -1
    if name not in settings.route_teachers:
        raise DataError(f"{where}: the record has teacher {name!r}; with distillation.teacher_mixture=route a record's "
                        f"'teacher' must be one of {', '.join(settings.route_teachers)}")
    return settings.route_teachers.index(name)


def _finish(input_ids: list[int], labels: list[int], settings: TokenizeSettings, stats: TokenizeStats,
            place: tuple[int, int] = (0, 0)) -> dict | None:
    if len(input_ids) > settings.max_seq_length:
        input_ids, labels = input_ids[: settings.max_seq_length], labels[: settings.max_seq_length]
        stats.truncated += 1
    targets = sum(1 for label in labels if label != IGNORE_INDEX)
    if targets == 0:
        stats.dropped_no_target += 1
        return None
    stats.examples += 1
    stats.target_tokens += targets
    return {"input_ids": input_ids, "labels": labels, "file": place[0], "line": place[1]}


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_prompt_completions(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], settings: TokenizeSettings
) -> list[tuple[list[int], list[int]]]:
    prompt_ids = tokenizer([p + settings.prompt_separator for p in prompts], add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    encoded = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        completion = completion + _eos(tokenizer)
        prompt_labels = [IGNORE_INDEX] * len(prompt) if settings.completion_only_loss else list(prompt)
        encoded.append((prompt + completion, prompt_labels + completion))
    return encoded


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [(row + _eos(tokenizer), row + _eos(tokenizer)) for row in ids]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], settings: TokenizeSettings) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation; labels cover assistant turns only (all turns if not completion-only)."""

    def render(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = render(len(messages), False)
    if not settings.completion_only_loss:
        return input_ids, list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(index, True)) if index else 0
        end = len(render(index + 1, False))
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _examples(
    paths: Sequence[Path], tokenizer: Any, settings: TokenizeSettings, read_stats: ReadStats, stats: TokenizeStats,
    teacher_tokenizer: Any = None,
) -> Iterator[dict]:
    pending: list[tuple[int, int, dict[str, str]]] = []

    def flush() -> Iterator[dict]:
        # Formats are tokenised in groups (one batched call each), then put back in file order.
        pcs = [(i, r) for i, (_, _, r) in enumerate(pending) if r["format"] == "prompt_completion"]
        texts = [(i, r) for i, (_, _, r) in enumerate(pending) if r["format"] == "text"]
        encoded: dict[int, tuple[list[int], list[int]]] = {}
        if pcs:
            rows = encode_prompt_completions(tokenizer, [r["prompt"] for _, r in pcs], [r["completion"] for _, r in pcs], settings)
            encoded.update(zip((i for i, _ in pcs), rows, strict=True))
        if texts:
            encoded.update(zip((i for i, _ in texts), encode_texts(tokenizer, [r["text"] for _, r in texts]), strict=True))
        for i, (_, _, record) in enumerate(pending):
            if record["format"] == "chat":
                encoded[i] = encode_chat(tokenizer, json.loads(record["messages"]), settings)
        places = [(file_index, line) for file_index, line, _ in pending]
        records = [record for _, _, record in pending]
        pending.clear()
        for i in range(len(places)):
            example = _finish(*encoded[i], settings, stats, places[i])
            if example is not None and teacher_tokenizer is not None:
                example.update(teacher_columns(records[i], tokenizer, teacher_tokenizer, settings.prompt_separator,
                                               example["labels"], settings.max_seq_length))
            if example is not None:
                if settings.route_teachers:
                    example["teacher"] = _route(records[i], settings, f"{paths[places[i][0]]} line {places[i][1]}")
                yield example

    for file_index, line, record in iter_numbered_records(paths, read_stats, settings.max_line_bytes):
        if record["format"] == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{', '.join(map(str, paths))}: records with 'messages' need a tokenizer with a chat template, "
                "and this tokenizer has none; set tokenizer.chat_template or convert them to prompt/completion"
            )
        pending.append((file_index, line, record))
        if len(pending) >= _BATCH:
            yield from flush()
    yield from flush()


def tokenization_key(paths: Sequence[Path], tokenizer: Any, settings: TokenizeSettings, teacher_tokenizer: Any = None) -> str:
    """The tokenised-data cache key: the files' content, the tokenizer and the settings (runs sharing it share
    one build); and a cross-tokenizer teacher's tokenizer when there is one."""
    files = files_fingerprint(paths)
    identity = {"files": sorted(files.values()), "tokenizer": tokenizer_fingerprint(tokenizer), "settings": asdict(settings),
                "nlm": nlm.__version__, "layout": _LAYOUT}
    if teacher_tokenizer is not None:
        identity["teacher_tokenizer"] = tokenizer_fingerprint(teacher_tokenizer)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_records(
    paths: Sequence[Path], tokenizer: Any, settings: TokenizeSettings, cache_root: Path | None = None,
    teacher_tokenizer: Any = None,
) -> TokenizedData:
    """Tokenise JSONL files into a Dataset of `input_ids` and `labels`, reusing an earlier identical build.

    The cache key covers the files' content, the tokenizer and the settings, so any change rebuilds.
    Records stream through an Arrow writer: memory stays bounded whatever the file size. With a
    `teacher_tokenizer` (a teacher whose tokenizer differs), each example also carries the teacher's ids and
    the aligned positions (`nlm.data.paired`).
    """
    files = files_fingerprint(paths)
    key = tokenization_key(paths, tokenizer, settings, teacher_tokenizer)
    cache_dir = cache_root / key if cache_root is not None else None
    if cache_dir is not None and (cache_dir / "stats.json").is_file():
        dataset = datasets.load_from_disk(str(cache_dir / "dataset"))
        stats = TokenizeStats(**json.loads((cache_dir / "stats.json").read_text()))
        logger.info("tokenised data reused from cache %s (%d examples)", cache_dir, stats.examples)
        return TokenizedData(dataset, stats, files, cache_hit=True)

    read_stats, stats = ReadStats(), TokenizeStats()
    with tempfile.TemporaryDirectory(prefix="nlm-tok-") as scratch:
        dataset = _generate(
            _examples,
            gen_kwargs={"paths": list(paths), "tokenizer": tokenizer, "settings": settings, "read_stats": read_stats, "stats": stats,
                        "teacher_tokenizer": teacher_tokenizer},
            features=features(settings) if teacher_tokenizer is None else PAIRED_FEATURES,
            cache_dir=scratch,
            # A fresh fingerprint each build: our own cache key decides reuse, not datasets' hashing of the generator.
            fingerprint=hashlib.sha256(f"{key}{id(stats)}".encode()).hexdigest(),
        )
        stats.read = read_stats.as_dict()
        if stats.examples == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no example has a target token after tokenisation")
        if cache_dir is not None:
            partial = cache_dir.with_name(cache_dir.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            dataset.save_to_disk(str(partial / "dataset"))
            (partial / "stats.json").write_text(json.dumps(asdict(stats)))
            record_written(partial, "nlm tokenize")  # an --overwrite of the folder around it removes exactly this
            shutil.rmtree(cache_dir, ignore_errors=True)
            partial.rename(cache_dir)
            dataset = datasets.load_from_disk(str(cache_dir / "dataset"))
        else:
            dataset = datasets.Dataset.from_dict(dataset.to_dict(), features=dataset.features)
    if stats.truncated:
        logger.warning("%d examples were longer than max_seq_length=%d and were truncated", stats.truncated, settings.max_seq_length)
    if stats.dropped_no_target:
        logger.warning("%d examples had no target token left (prompt fills max_seq_length) and were dropped", stats.dropped_no_target)
    logger.info("tokenised %d examples (%d target tokens) from %d file(s)", stats.examples, stats.target_tokens, len(paths))
    return TokenizedData(dataset, stats, files)


def _generate(generator: Any, **kwargs: Any) -> datasets.Dataset:
    """Dataset.from_generator, re-raising our own errors that datasets wraps in DatasetGenerationError."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.Dataset.from_generator(generator, **kwargs)
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, NlmError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


@dataclass
class PaddingCollator:
    """Pads a list of examples to the longest one: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    teacher_pad_token_id: int = 0  # pads `teacher_input_ids` (a teacher with its own tokenizer)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            ids, labels = list(example["input_ids"]), list(example["labels"])
            pad = longest - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
        tensors: dict[str, Any] = {name: torch.tensor(rows, dtype=torch.long) for name, rows in batch.items()}
        if "index" in examples[0]:  # the example's position in the training data, for the teacher cache
            tensors["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        if "teacher" in examples[0]:  # the teacher scoring each example (teacher_mixture: route)
            tensors["teacher"] = torch.tensor([e["teacher"] for e in examples], dtype=torch.long)
        if "source" in examples[0]:  # the example's mixture source: per-source loss, multi-teacher routing
            tensors["source"] = torch.tensor([e["source"] for e in examples], dtype=torch.long)
            tensors["source_name"] = [e["source_name"] for e in examples]
        if "teacher_input_ids" in examples[0]:
            tensors.update(_pad_paired(examples, self.teacher_pad_token_id))
        return tensors


def _pad_paired(examples: list[dict], pad_token_id: int) -> dict:
    """Teacher ids padded like the student's; aligned positions padded with -1 (no group)."""
    import torch

    longest = max(len(e["teacher_input_ids"]) for e in examples)
    groups = max(1, max(len(e["align_student"]) for e in examples))
    ids = [list(e["teacher_input_ids"]) + [pad_token_id] * (longest - len(e["teacher_input_ids"])) for e in examples]
    mask = [[1] * len(e["teacher_input_ids"]) + [0] * (longest - len(e["teacher_input_ids"])) for e in examples]
    teacher_labels = [list(e["teacher_labels"]) + [IGNORE_INDEX] * (longest - len(e["teacher_labels"])) for e in examples]
    return {
        "teacher_input_ids": torch.tensor(ids, dtype=torch.long),
        "teacher_labels": torch.tensor(teacher_labels, dtype=torch.long),
        "teacher_attention_mask": torch.tensor(mask, dtype=torch.long),
        **{name: torch.tensor([list(e[name]) + [-1] * (groups - len(e[name])) for e in examples])
           for name in ("align_student", "align_teacher", "align_student_end", "align_teacher_end")},
    }
