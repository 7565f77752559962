"""`nlm eval`: score a model on a JSONL file: loss, perplexity, token accuracy; with a teacher, KL and agreement."""

from __future__ import annotations

import logging
import tempfile
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from nlm.data.reader import load_records
from nlm.data.tokenize import PaddingCollator, TokenizeSettings, tokenize_records
from nlm.distill.cross_metrics import CrossEvalSums, score_cross_batch
from nlm.distill.metrics import EvalSums, score_batch
from nlm.distill.teacher import LiveTeacher, Teacher
from nlm.models.device import select_device
from nlm.models.generation import GenerationSettings, generate_texts
from nlm.models.heads import head_reproduces_logits
from nlm.models.loading import load_tokenizer, load_trained_model
from nlm.models.vocab import own_vocab_width, shared_vocab_width, tokenizers_equal

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_model(
    model_path: str | Path,
    data_file: Path,
    *,
    teacher_path: str | Path | None = None,
    batch_size: int = 8,
    settings: TokenizeSettings | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    exact_match: bool = False,
    max_new_tokens: int = 32,
    served: Any = None,
) -> dict[str, Any]:
    """Token-level metrics of `model_path` on `data_file` (targets as in training: completion tokens). A teacher
    in process (`teacher_path`) adds the KL and the top-1 agreement; `served` (`ServedSettings`): the teacher is
    behind a server (`teacher_url`), and its top-K rows give the KL over K + 1 buckets and the agreement."""
    settings = settings or TokenizeSettings()
    tokenizer = load_tokenizer(str(model_path), trust_remote_code=trust_remote_code)  # a wrong path fails first
    # Data before models: a file the tokenizer cannot encode (chat records, no template) fails in a second.
    # Tokenised on disk and memory-mapped (as in training), in a scratch folder removed afterwards: memory
    # does not grow with the size of the eval file. Every teacher built is closed on the way out (`held`).
    with tempfile.TemporaryDirectory(prefix="nlm-eval-") as scratch, ExitStack() as held:
        data = tokenize_records([Path(data_file)], tokenizer, settings, cache_root=Path(scratch))
        teacher: Teacher | None = None
        named: dict[str, Any] = {}
        if served is not None:
            from nlm.distill.served_teacher import load_served_teacher

            # Before the student loads: an unreachable server or another tokenizer fails first (exit 2).
            served_teacher = held.enter_context(closing(load_served_teacher(None, tokenizer, served, temperature=1.0)))
            teacher, named = served_teacher, {"teacher": served_teacher.client.url, "teacher_top_k": served_teacher.top_k}
        target = select_device(forced=device) if device else select_device()
        model = load_trained_model(model_path, device=target, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        width = len(tokenizer)
        result: dict[str, Any] | None = None
        if teacher_path is not None and served is None:  # a served teacher wins, as before (the CLI refuses both)
            named = {"teacher": str(teacher_path)}
            teacher_model = load_trained_model(teacher_path, device=target, trust_remote_code=trust_remote_code,
                                               allow_pickle=allow_pickle)
            teacher_tokenizer = load_tokenizer(str(teacher_path), trust_remote_code=trust_remote_code)
            if not tokenizers_equal(teacher_tokenizer, tokenizer):
                result = evaluate_across_tokenizers(model, tokenizer, teacher_model, teacher_tokenizer, Path(data_file),
                                                    settings, batch_size, target)
                fields = {"model": str(model_path), "data": str(data_file), **named}
            else:
                width = shared_vocab_width(teacher_tokenizer, tokenizer, teacher_model, model)
                teacher = held.enter_context(closing(LiveTeacher(teacher_model, target, width)))
        if result is None:
            result = _score_dataset(model, data, tokenizer.pad_token_id, width, batch_size, target, teacher)
            fields = {"model": str(model_path), "data": str(data_file), "examples": len(data.dataset), **named}
    if exact_match:
        result["exact_match"] = exact_match_accuracy(model, tokenizer, Path(data_file), settings, batch_size, max_new_tokens)
    result.update(fields)
    return result


def _score_dataset(model: Any, data: Any, pad_token_id: int | None, width: int, batch_size: int, target: torch.device,
                  teacher: Teacher | None) -> dict[str, Any]:
    """Loss, perplexity and token accuracy of `model` over the tokenised `data`; with a teacher (in process or
    served) its KL and top-1 agreement over the first `width` ids. The teacher's `read_ahead` wraps the batches
    (a served teacher asks for the next ones while this one is scored); closing it is the caller's."""
    loader = DataLoader(data.dataset, batch_size=batch_size, collate_fn=PaddingCollator(pad_token_id or 0))
    sample = torch.tensor([data.dataset[0]["input_ids"][:8]], device=target)
    # Chunked scoring (no full logits) unless a model post-processes its logits after the head.
    scored = [model, *(teacher.models() if teacher is not None else [])]
    chunked = all(head_reproduces_logits(each, sample) for each in scored)
    batches = teacher.read_ahead(iter(loader)) if teacher is not None else iter(loader)
    sums = EvalSums()
    for batch in batches:
        score_batch(sums, model, {k: v.to(target) for k, v in batch.items()}, width, teacher=teacher, chunked=chunked)
    return sums.metrics()


def evaluate_across_tokenizers(model: Any, tokenizer: Any, teacher_model: Any, teacher_tokenizer: Any, data_file: Path,
                               settings: TokenizeSettings, batch_size: int, device: torch.device) -> dict[str, Any]:
    """A teacher with another tokenizer: the student's token metrics, both models' bits per byte of the same
    target text, and the aligned ULD divergence (docs/CROSS_TOKENIZER.md)."""
    student_width = own_vocab_width(tokenizer, model, "student")
    teacher_width = own_vocab_width(teacher_tokenizer, teacher_model, "teacher")
    sums, cross = EvalSums(), CrossEvalSums()
    with tempfile.TemporaryDirectory(prefix="nlm-eval-") as scratch:  # memory-mapped, as in training
        data = tokenize_records([data_file], tokenizer, settings, cache_root=Path(scratch), teacher_tokenizer=teacher_tokenizer)
        collate = PaddingCollator(tokenizer.pad_token_id or 0, teacher_pad_token_id=teacher_tokenizer.pad_token_id or 0)
        for batch in DataLoader(data.dataset, batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            score_batch(sums, model, batch, student_width, teacher=None, chunked=True)
            score_cross_batch(cross, model, teacher_model, batch, student_width, teacher_width, tokenizer)
        examples = len(data.dataset)
    result = sums.metrics()
    result.update(cross.metrics())
    result["examples"] = examples
    return result


def exact_match_accuracy(
    model: Any, tokenizer: Any, data_file: Path, settings: TokenizeSettings, batch_size: int, max_new_tokens: int
) -> float:
    """Share of prompt/completion records whose greedy completion equals the reference (whitespace-trimmed)."""
    records, _ = load_records([data_file], settings.max_line_bytes)
    pairs = [(r["prompt"] + settings.prompt_separator, r["completion"].strip()) for r in records if r["format"] == "prompt_completion"]
    if not pairs:
        return float("nan")
    generation = GenerationSettings(max_new_tokens=max_new_tokens)
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        outputs = generate_texts(model, tokenizer, [prompt for prompt, _ in chunk], generation)
        correct += sum(out[0].strip() == reference for out, (_, reference) in zip(outputs, chunk, strict=True))
    return correct / len(pairs)
