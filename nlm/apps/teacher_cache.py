"""`nlm teacher-cache`: run the teacher once over the tokenised training data and write the cache.

Batched, resumable (finished shards are kept and skipped on a rerun), with a progress line per shard.
The teacher's logits are computed chunk-wise from its hidden states, so a large vocabulary never needs a
full [batch, seq, vocab] tensor. With several teachers (`teachers:`) the cache stores their mixture at
the cache's temperature, and its fingerprint records every teacher with its weight. A teacher with another
tokenizer (`distillation.cross_tokenizer: alm`) gets a cache of group likelihoods (`nlm.distill.cross_cache`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from nlm.config.paths import claim_folder, mark_folder, require_owned, safe_output_dir
from nlm.config.settings import TrainingConfig
from nlm.data.files import resolve_train_files
from nlm.data.prepare import tokenize_settings
from nlm.data.tokenize import IGNORE_INDEX, PaddingCollator, tokenize_records
from nlm.distill.aligned_teacher import AlignedTeacher
from nlm.distill.cache import (
    FORMAT,
    VERSION,
    ShardRows,
    bytes_per_token,
    cache_fingerprint,
    compare_fingerprints,
    id_dtype,
    read_manifest,
    rounded_targets,
    sampled_tail,
    save_shard,
    weights_fingerprint,
    write_manifest,
)
from nlm.distill.cross_cache import (
    BYTES_PER_GROUP,
    KIND,
    TEACHER_TOKENIZER,
    check_method,
    cross_fingerprint,
    group_shard,
    save_group_shard,
)
from nlm.distill.engines.aligned import CrossSettings
from nlm.distill.engines.chunks import chunk_rows
from nlm.distill.targets import SparseTargets, target_logp
from nlm.distill.teacher import Teacher
from nlm.distill.teacher_loading import load_teacher, teacher_specs
from nlm.errors import ConfigError, RunExistsError
from nlm.models.device import resolve_precision, select_device, teacher_dtype
from nlm.models.heads import head_reproduces_logits
from nlm.models.loading import hub_options, load_causal_lm, load_tokenizer, model_revision
from nlm.models.vocab import own_vocab_width, tokenizers_equal

logger = logging.getLogger(__name__)

# What `nlm teacher-cache` writes in its folder; `--overwrite` removes only these.
CACHE_ENTRIES = ("manifest.json", "manifest.json.partial", "shard-*.safetensors", "shard-*.partial", "tokenized",
                 TEACHER_TOKENIZER)


@torch.no_grad()
def _shard_rows(teacher: Teacher, batches: list[dict], temperature: float, top_k: int, dtype: torch.dtype,
                device: torch.device, hidden_layers: tuple[int, ...] = (), tail_samples: int = 0,
                seed: int = 0) -> ShardRows:
    """`tail_samples`: of the top_k slots, that many are draws from the tail (`sampled_tail`), seeded by `seed`."""
    ids, logp, tail, offsets = [], [], [], [0]
    generator: torch.Generator | None = None  # made on the teacher rows' device: the draws stay where the logits are
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
    rows_per_chunk = chunk_rows(teacher.vocab_width, device)
    for batch in teacher.read_ahead(iter(batches)):  # a served teacher: the next batches' requests in flight
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # [b, s-1]: the positions the loss trains on
        signal = teacher.signal(batch, mask, device, layers=hidden_layers)
        for layer in hidden_layers:  # bfloat16: fp32's range (large activations fit), half the bytes
            hidden[layer].append(signal.hidden[layer].to("cpu", torch.bfloat16))
        for start in range(0, signal.count, rows_per_chunk):
            rows = signal.rows(start, min(start + rows_per_chunk, signal.count))
            if isinstance(rows, SparseTargets):  # a served teacher: its top-k at the temperature already
                top_ids, top_values = rows.ids[:, :top_k], rows.logp[:, :top_k]
            elif tail_samples:
                logp_rows = target_logp(rows, temperature)
                if generator is None:
                    generator = torch.Generator(device=logp_rows.device).manual_seed(seed)
                top_ids, top_values = sampled_tail(logp_rows, top_k - tail_samples, tail_samples, generator)
            else:
                top = target_logp(rows, temperature).topk(top_k, dim=-1)
                top_ids, top_values = top.indices, top.values
            ids.append(top_ids.to("cpu", dtype))
            stored, rest = rounded_targets(top_values)
            logp.append(stored.cpu())
            # Sampled rows list the whole distribution (their probabilities sum to one up to the fp16 rounding
            # down): the tail bucket holds no mass, so the loss gives the student's rest no pull either way.
            tail.append(rest.cpu().fill_(float("-inf")) if tail_samples else rest.cpu())
        for row in range(mask.shape[0]):
            offsets.append(offsets[-1] + int(mask[row].sum()))
    return ShardRows(torch.cat(ids), torch.cat(logp), torch.cat(tail), torch.tensor(offsets, dtype=torch.int64),
                     {layer: torch.cat(parts) for layer, parts in hidden.items()})


def cached_hidden_layers(config: TrainingConfig, teacher_layers: int, teacher_width: int) -> tuple[int, ...]:
    """The teacher layers whose hidden states the run's `distillation.hidden_states` compares (none when off).

    `layers: auto` depends on the student's depth: its config is read (no weights)."""
    if config.distillation.hidden_states.weight <= 0:
        return ()
    if not config.student_model:
        raise ConfigError("teacher-cache with distillation.hidden_states maps student layers onto the teacher's: pass --student_model")
    from transformers import AutoConfig

    from nlm.distill.hidden_states import HiddenShapes
    from nlm.distill.objective import objective_from_config
    from nlm.models.prune import kept_layers

    student = AutoConfig.from_pretrained(config.student_model, revision=config.student_revision, token=config.hf_token,
                                         trust_remote_code=config.trust_remote_code)
    shapes = HiddenShapes(int(student.num_hidden_layers), int(student.hidden_size), teacher_layers, teacher_width,
                          kept_layers(student, teacher_layers))
    try:
        term = objective_from_config(config.distillation, shapes).term("hidden_states")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return tuple(sorted(set(term.teacher_layers)))


def cross_student_tokenizer(config: TrainingConfig, teacher_tokenizer: Any) -> Any | None:
    """The student's tokenizer when this cache is for a teacher with another tokenizer (cross_tokenizer), else None."""
    method = config.distillation.cross_tokenizer
    if not method:
        return None
    if not config.student_model:
        raise ConfigError("teacher-cache with distillation.cross_tokenizer aligns the teacher's tokens with the student's: "
                          "pass --student_model")
    student_tokenizer = load_tokenizer(config.student_model, **hub_options(config, config.student_revision))
    if tokenizers_equal(teacher_tokenizer, student_tokenizer):
        logger.info("distillation.cross_tokenizer=%s ignored: teacher and student share a tokenizer", method)
        return None
    check_method(method)
    if config.teachers:
        raise ConfigError("teacher-cache with distillation.cross_tokenizer takes one teacher (teacher_model), not teachers")
    return student_tokenizer


def _weights_fingerprint(config: TrainingConfig, teacher: Teacher) -> str | list[str]:
    if config.teacher_url:  # a served teacher: what the server said it serves
        described = teacher.describe()
        return f"served:{described['teacher_url']}#{described['served_model']}@{described['tokenizer_fingerprint']}"
    specs = teacher_specs(config)
    found = [model_revision(model) or weights_fingerprint(spec.model, spec.revision)
             for model, spec in zip(teacher.models(), specs, strict=True)]
    return found if config.teachers else found[0]


def _open_output(output: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The cache folder, claimed and marked as nlm's; the manifest of an earlier build of the same cache, if any."""
    existing = read_manifest(output)
    if overwrite and output.is_dir() and any(output.iterdir()):
        claim_folder(output, created_by="nlm teacher-cache", owns=CACHE_ENTRIES, overwrite=True, exists_message="")
        existing = None
    if existing is not None:
        try:
            compare_fingerprints(fingerprint, existing["fingerprint"], output)
        except ValueError as exc:
            raise RunExistsError(f"{exc}; or pass --overwrite to replace it") from None
        if existing.get("complete"):
            return existing
    elif output.is_dir() and any(output.iterdir()):
        require_owned(output)  # a marked folder without a manifest: an earlier build stopped before its first shard
    mark_folder(output, "nlm teacher-cache", CACHE_ENTRIES)
    return existing


def _load_cache_teacher(config: TrainingConfig, tokenizer: Any, student_tokenizer: Any | None, device: torch.device,
                        width: int, output: Path) -> tuple[Teacher, int]:
    """The teacher whose targets are cached (nlm.distill.teacher_loading), or with another tokenizer the aligned
    teacher whose group likelihoods are (its tokenizer saved beside the cache); and the vocabulary width."""
    specs = teacher_specs(config)
    hub = hub_options(config, specs[0].revision) if specs else {}  # no specs: a served teacher (teacher_url)
    precision = resolve_precision(config.precision, device)
    if student_tokenizer is None:
        teacher = load_teacher(config, tokenizer, None, device, precision)  # on teacher_device when set
    else:
        model = load_causal_lm(specs[0].model, dtype=teacher_dtype(config.teacher_precision, precision, device), **hub)
        width = own_vocab_width(tokenizer, model, "teacher")
        teacher = AlignedTeacher(model, torch.device(config.teacher_device) if config.teacher_device else device, width,
                                 tokenizer, CrossSettings("alm"))
        tokenizer.save_pretrained(str(output / TEACHER_TOKENIZER))  # the run aligns its data with it
    assert teacher is not None
    return teacher, width


def _write_shards(output: Path, manifest: dict[str, Any], dataset: Any, collate: Any, write: Any, batch_size: int,
                  shard_examples: int) -> None:
    """Shards from the first example the manifest lacks to the end; the manifest rewritten after each one."""
    done = sum(shard["examples"] for shard in manifest["shards"])
    if done:
        logger.info("resuming teacher cache at example %d of %d", done, len(dataset))
    started = time.perf_counter()
    while done < len(dataset):
        end = min(done + shard_examples, len(dataset))
        batches = [collate([dataset[i] for i in range(s, min(s + batch_size, end))]) for s in range(done, end, batch_size)]
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        count = write(output / name, batches)
        manifest["shards"].append({"file": name, "first_example": done, "examples": end - done, "tokens": count})
        manifest["tokens"] += count
        write_manifest(output, manifest)
        elapsed = time.perf_counter() - started
        rate = (end - done) / max(elapsed, 1e-9)
        logger.info("teacher cache: %d/%d examples (%.0f examples/s, about %.0fs left)", end, len(dataset), rate,
                    (len(dataset) - end) / max(rate, 1e-9))
        done, started = end, time.perf_counter()


def _new_manifest(config: TrainingConfig, fingerprint: dict[str, Any], teacher: Teacher, teacher_weights: Any, top_k: int,
                  width: int, examples: int, hidden_layers: tuple[int, ...], cross: bool) -> dict[str, Any]:
    """The manifest of a cache not started yet: what it holds, per token, and no shard."""
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
        "teacher_weights": teacher_weights, "teachers": teacher.describe().get("teachers"),
        "top_k": top_k, "temperature": config.distillation.temperature, "vocab_size": width,
        "id_dtype": str(id_dtype(width)).removeprefix("torch."), "bytes_per_token": bytes_per_token(top_k, width),
        "examples": examples, "tokens": 0, "shards": [], "complete": False,
    }
    if hidden_layers:  # bfloat16 rows of each chosen layer
        manifest.update({"hidden_layers": list(hidden_layers), "teacher_num_layers": int(teacher.hidden_layers),
                         "teacher_hidden_size": int(teacher.hidden_size()),
                         "bytes_per_token": manifest["bytes_per_token"] + 2 * len(hidden_layers) * int(teacher.hidden_size())})
    if cross:  # "tokens" counts aligned groups, 4 bytes each
        manifest.update({"kind": KIND, "temperature": 1.0, "id_dtype": None, "bytes_per_token": BYTES_PER_GROUP})
    return manifest


def _checked_teacher(config: TrainingConfig, teacher: Teacher, dataset: Any, cross: bool, device: torch.device,
                     existing: dict[str, Any] | None, output: Path) -> tuple[int, ...]:
    """Refuse teachers whose head does not give their logits; the teacher layers whose hidden states are cached."""
    specs = teacher_specs(config)
    sample = torch.tensor([dataset[0]["teacher_input_ids" if cross else "input_ids"]], device=device)
    for spec, model in zip(specs, teacher.models(), strict=True):
        if not head_reproduces_logits(model, sample.to(next(model.parameters()).device)):
            raise ConfigError(f"{spec.model} post-processes its logits (soft-capping or scaling); the cache cannot be built from its head")

    hidden_layers: tuple[int, ...] = ()
    if not cross and config.distillation.hidden_states.weight > 0:
        if config.teachers:
            raise ConfigError("teacher-cache stores hidden states of one teacher (teacher_model), not of several")
        hidden_layers = cached_hidden_layers(config, int(teacher.hidden_layers), int(teacher.hidden_size()))
        if existing is not None and tuple(existing.get("hidden_layers") or ()) != hidden_layers:
            raise RunExistsError(f"teacher cache {output} was started with hidden states of teacher layers "
                                 f"{existing.get('hidden_layers')}, now {list(hidden_layers)}: pass --overwrite to rebuild it")
    return hidden_layers


def build_teacher_cache(config: TrainingConfig, output: Path, top_k: int = 64, batch_size: int = 8,
                        shard_examples: int = 1024, overwrite: bool = False, tail_samples: int = 0) -> dict[str, Any]:
    """Write (or finish) the cache for `config`'s teacher and training data; returns the manifest.

    `tail_samples`: of the `top_k` slots per token, that many are draws from the teacher's tail instead of its
    next-best tokens (`nlm.distill.cache.sampled_tail`; for forward KL, the default divergence)."""
    specs = teacher_specs(config)
    if tail_samples and not 1 <= tail_samples < top_k:
        raise ConfigError(f"tail_samples = {tail_samples}: expected 1 <= tail_samples < top_k ({top_k}); the rest of the "
                          "slots keep the teacher's top tokens")
    if tail_samples and config.teacher_url:
        raise ConfigError("tail_samples needs the teacher's whole distribution; a served teacher (teacher_url) returns only "
                          "its top-k: build the cache without --tail_samples, or from teacher_model")
    if tail_samples and config.distillation.cross_tokenizer:
        raise ConfigError("tail_samples applies to a top-k cache; a cross_tokenizer cache stores group likelihoods")
    if not specs and not config.teacher_url:
        raise ConfigError("teacher-cache needs the teacher: pass --teacher MODEL (or --teacher_model, --teacher_url, or "
                          "teachers in the config)")
    if config.teacher_url and not config.student_model:
        raise ConfigError("teacher-cache from teacher_url tokenises the data with the student's tokenizer: pass --student_model")
    if config.distillation.teacher_mixture == "route" and config.teachers:
        raise ConfigError("teacher-cache stores one target per token: use teacher_mixture=average, or cache each teacher apart")
    train_files = resolve_train_files(config.train_file)  # a missing data file fails before the teacher loads
    output = safe_output_dir(output)
    if config.teacher_url:  # issue 30: nothing loads before the server answered (exit 2 naming the URL)
        from nlm.distill.served_teacher import probe_server

        config = config.model_copy(update={"teacher_top_k": top_k})  # the server is asked for the cache's k
        probe_server(config)[0].close()
    source = (specs[0].model, specs[0].revision) if specs else (config.student_model, config.student_revision)
    hub = hub_options(config, source[1])
    tokenizer = load_tokenizer(source[0], **hub)
    width = len(tokenizer)
    student_tokenizer = cross_student_tokenizer(config, tokenizer)
    if student_tokenizer is not None:
        top_k = 0  # one likelihood per aligned group, no top-k
    elif not 1 <= top_k < width:
        raise ConfigError(f"top_k = {top_k}: expected 1 <= top_k < vocabulary size {width}")
    fingerprint = cache_fingerprint(config, tokenizer, top_k, tail_samples)
    if student_tokenizer is not None:
        fingerprint.update(cross_fingerprint(student_tokenizer))
        if config.distillation.hidden_states.weight > 0:
            raise ConfigError("distillation.hidden_states needs a teacher sharing the student's tokenizer")
    existing = _open_output(output, fingerprint, overwrite)
    if existing is not None and existing.get("complete"):
        logger.info("teacher cache %s is already complete (%d tokens)", output, existing["tokens"])
        return existing

    device = select_device(config.device_preference, config.device)
    teacher, width = _load_cache_teacher(config, tokenizer, student_tokenizer, device, width, output)
    assert teacher is not None
    teacher_weights = _weights_fingerprint(config, teacher)
    if existing is not None and existing.get("teacher_weights") != teacher_weights:
        raise RunExistsError(
            f"teacher cache {output} was started from other teacher weights ({existing.get('teacher_weights')}, now "
            f"{teacher_weights}); its shards cannot be mixed with this teacher's: pass --overwrite to rebuild it"
        )
    # Tokenised data stay on disk (memory-mapped Arrow) in the cache folder, as in training: memory does not
    # grow with the corpus.
    tokenized_root = output / "tokenized"
    data = tokenize_records(train_files, student_tokenizer or tokenizer, tokenize_settings(config),
                            cache_root=tokenized_root, teacher_tokenizer=student_tokenizer and tokenizer)
    dataset = data.dataset
    hidden_layers = _checked_teacher(config, teacher, dataset, student_tokenizer is not None, device, existing, output)
    manifest = existing or _new_manifest(config, fingerprint, teacher, teacher_weights, top_k, width, len(dataset),
                                         hidden_layers, cross=student_tokenizer is not None)
    if tail_samples:
        manifest["tail_samples"] = tail_samples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # A resumed build keeps the id type its manifest recorded (a cache started before ids were narrowed to
    # uint16 stays int32 throughout), so every shard of one cache holds one type.
    ids_type = getattr(torch, manifest["id_dtype"]) if manifest.get("id_dtype") else id_dtype(width)

    def write_topk(path: Path, batches: list[dict]) -> int:
        # Draws seeded by the run's seed and the shard's number: a resumed build redraws what it would have drawn.
        seed = config.seed * 1_000_003 + int(path.stem.rsplit("-", 1)[-1])
        rows = _shard_rows(teacher, batches, config.distillation.temperature, top_k, ids_type, device, hidden_layers,
                           tail_samples, seed)
        save_shard(path, rows)
        return int(rows.ids.shape[0])

    def write_groups(path: Path, batches: list[dict]) -> int:  # a teacher with another tokenizer (alm)
        assert isinstance(teacher, AlignedTeacher)
        loglik, offsets = group_shard(teacher, batches)
        save_group_shard(path, loglik, offsets)
        return int(loglik.shape[0])

    if student_tokenizer is None:
        collate, write = PaddingCollator(pad), write_topk
    else:
        collate = PaddingCollator(student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else 0,
                                  teacher_pad_token_id=pad)
        write = write_groups
    _write_shards(output, manifest, dataset, collate, write, batch_size, shard_examples)
    manifest["complete"] = True
    write_manifest(output, manifest)
    logger.info("teacher cache complete: %s (%d tokens, %d bytes per token)", output, manifest["tokens"], manifest["bytes_per_token"])
    return manifest
