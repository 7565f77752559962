"""`nlm teacher-cache`: run the teacher once over the tokenised training data and write the cache.

Batched, resumable (finished shards are kept and skipped on a rerun), with a progress line per shard.
The teacher's logits are computed chunk-wise from its hidden states, so a large vocabulary never needs a
full [batch, seq, vocab] tensor. With several teachers (`teachers:`) the cache stores their mixture at
the cache's temperature, and its fingerprint records every teacher with its weight.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import nlm
from nlm.config.paths import safe_output_dir
from nlm.config.settings import TrainingConfig
from nlm.data.files import files_fingerprint, resolve_train_files
from nlm.data.prepare import tokenize_settings
from nlm.data.tokenize import IGNORE_INDEX, PaddingCollator, tokenize_records, tokenizer_fingerprint
from nlm.distill.cache import (
    FORMAT,
    VERSION,
    ShardRows,
    bytes_per_token,
    compare_fingerprints,
    id_dtype,
    read_manifest,
    save_shard,
    weights_fingerprint,
    write_manifest,
)
from nlm.distill.fused import chunk_rows
from nlm.distill.targets import tail_logp, target_logp
from nlm.distill.teacher import Teacher
from nlm.distill.teacher_loading import load_teacher, teacher_specs
from nlm.errors import ConfigError, RunExistsError
from nlm.models.device import resolve_precision, select_device
from nlm.models.heads import head_reproduces_logits
from nlm.models.loading import load_tokenizer, model_revision

logger = logging.getLogger(__name__)


def cache_fingerprint(config: TrainingConfig, tokenizer: Any, top_k: int) -> dict[str, Any]:
    """Everything the cached numbers depend on that a training run can check without the teacher."""
    settings = tokenize_settings(config)
    fingerprint = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "temperature": config.distillation.temperature,
        "max_seq_length": settings.max_seq_length,
        "completion_only_loss": settings.completion_only_loss,
        "prompt_separator": settings.prompt_separator,
        "data_files": sorted(files_fingerprint(resolve_train_files(config.train_file)).values()),
        "top_k": top_k,
        "nlm_version": nlm.__version__,
    }
    if config.teacher_model:
        fingerprint["teacher_model"] = config.teacher_model
    if config.teachers:
        fingerprint["teachers"] = [{"model": t.model, "weight": t.weight, "revision": t.revision} for t in config.teachers]
        fingerprint["teacher_mixture"] = config.distillation.teacher_mixture
    return fingerprint


@torch.no_grad()
def _shard_rows(teacher: Teacher, batches: list[dict], temperature: float, top_k: int, dtype: torch.dtype,
                device: torch.device) -> ShardRows:
    ids, logp, tail, offsets = [], [], [], [0]
    rows_per_chunk = chunk_rows(teacher.vocab_width)
    for batch in batches:
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # [b, s-1]: the positions the loss trains on
        signal = teacher.signal(batch, mask, device)
        for start in range(0, signal.count, rows_per_chunk):
            rows = signal.rows(start, min(start + rows_per_chunk, signal.count))
            top = target_logp(rows, temperature).topk(top_k, dim=-1)
            ids.append(top.indices.to("cpu", dtype))
            logp.append(top.values.to("cpu", torch.float16))
            tail.append(tail_logp(top.values).cpu())
        for row in range(mask.shape[0]):
            offsets.append(offsets[-1] + int(mask[row].sum()))
    return ShardRows(torch.cat(ids), torch.cat(logp), torch.cat(tail), torch.tensor(offsets, dtype=torch.int64))


def _weights_fingerprint(config: TrainingConfig, teacher: Teacher) -> str | list[str]:
    specs = teacher_specs(config)
    found = [model_revision(model) or weights_fingerprint(spec.model, spec.revision)
             for model, spec in zip(teacher.models(), specs, strict=True)]
    return found if config.teachers else found[0]


def build_teacher_cache(config: TrainingConfig, output: Path, top_k: int = 64, batch_size: int = 8,
                        shard_examples: int = 1024, overwrite: bool = False) -> dict[str, Any]:
    """Write (or finish) the cache for `config`'s teacher and training data; returns the manifest."""
    specs = teacher_specs(config)
    if not specs:
        raise ConfigError("teacher-cache needs the teacher: pass --teacher MODEL (or --teacher_model, or teachers in the config)")
    if config.distillation.teacher_mixture == "route" and config.teachers:
        raise ConfigError("teacher-cache stores one target per token: use teacher_mixture=average, or cache each teacher apart")
    output = safe_output_dir(output)
    hub = {"revision": specs[0].revision, "token": config.hf_token, "trust_remote_code": config.trust_remote_code}
    tokenizer = load_tokenizer(specs[0].model, **hub)
    width = len(tokenizer)
    if not 1 <= top_k < width:
        raise ConfigError(f"top_k = {top_k}: expected 1 <= top_k < vocabulary size {width}")
    fingerprint = cache_fingerprint(config, tokenizer, top_k)
    existing = read_manifest(output)
    if existing is not None and overwrite:
        shutil.rmtree(output)
        existing = None
    if existing is not None:
        try:
            compare_fingerprints(fingerprint, existing["fingerprint"], output)
        except ValueError as exc:
            raise RunExistsError(f"{exc}; or pass --overwrite to replace it") from None
        if existing.get("complete"):
            logger.info("teacher cache %s is already complete (%d tokens)", output, existing["tokens"])
            return existing
    elif output.exists() and any(output.iterdir()):
        raise RunExistsError(f"{output} is not empty and holds no teacher cache; choose another --output")
    output.mkdir(parents=True, exist_ok=True)

    device = select_device(config.device_preference, config.device)
    precision = resolve_precision(config.precision, device)
    teacher = load_teacher(config, tokenizer, None, device, precision)
    assert teacher is not None
    data = tokenize_records(resolve_train_files(config.train_file), tokenizer, tokenize_settings(config), cache_root=None)
    dataset = data.dataset
    sample = torch.tensor([dataset[0]["input_ids"]], device=device)
    for spec, model in zip(specs, teacher.models(), strict=True):
        if not head_reproduces_logits(model, sample.to(next(model.parameters()).device)):
            raise ConfigError(f"{spec.model} post-processes its logits (soft-capping or scaling); the cache cannot be built from its head")

    manifest = existing or {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
        "teacher_weights": _weights_fingerprint(config, teacher), "teachers": teacher.describe().get("teachers"),
        "top_k": top_k, "temperature": config.distillation.temperature, "vocab_size": width,
        "id_dtype": str(id_dtype(width)).removeprefix("torch."), "bytes_per_token": bytes_per_token(top_k, width),
        "examples": len(dataset), "tokens": 0, "shards": [], "complete": False,
    }
    collate = PaddingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    done = sum(shard["examples"] for shard in manifest["shards"])
    if done:
        logger.info("resuming teacher cache at example %d of %d", done, len(dataset))
    started = time.perf_counter()
    while done < len(dataset):
        end = min(done + shard_examples, len(dataset))
        batches = [collate([dataset[i] for i in range(s, min(s + batch_size, end))]) for s in range(done, end, batch_size)]
        rows = _shard_rows(teacher, batches, config.distillation.temperature, top_k, id_dtype(width), device)
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        save_shard(output / name, rows)
        manifest["shards"].append({"file": name, "first_example": done, "examples": end - done, "tokens": int(rows.ids.shape[0])})
        manifest["tokens"] += int(rows.ids.shape[0])
        write_manifest(output, manifest)
        elapsed = time.perf_counter() - started
        rate = (end - done) / max(elapsed, 1e-9)
        logger.info("teacher cache: %d/%d examples (%.0f examples/s, about %.0fs left)", end, len(dataset), rate,
                    (len(dataset) - end) / max(rate, 1e-9))
        done, started = end, time.perf_counter()
    manifest["complete"] = True
    write_manifest(output, manifest)
    logger.info("teacher cache complete: %s (%d tokens, %d bytes per token)", output, manifest["tokens"], manifest["bytes_per_token"])
    return manifest
