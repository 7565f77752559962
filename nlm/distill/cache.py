"""The offline teacher cache: the teacher's top-k log-probabilities for every target token, on disk.

Written by hand because the format is nlm's own (see docs/TEACHER_CACHE.md): a manifest with a fingerprint
of everything the numbers depend on, and safetensors shards (little-endian, memory-mapped on read) with, per
target token, k token ids (int16 or uint16 when the vocabulary fits, else int32), their log-probabilities at the
cache's temperature (float16) and the log of the remaining mass (float32): 4k+4 or 6k+4 bytes per token.

With `tail_samples: M` the k slots are the top k - M plus M draws from the rest of the distribution (see
`sampled_tail`): an unbiased estimate of the whole distribution instead of the top k and one tail bucket.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nlm
from nlm.data.files import files_fingerprint, resolve_train_files
from nlm.data.prepare import tokenize_settings
from nlm.data.tokenize import tokenizer_fingerprint
from nlm.distill.targets import SparseTargets
from nlm.errors import ConfigError

FORMAT = "nlm-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"


class CacheMismatchError(ConfigError, ValueError):
    """The cache was built for other data, teacher, tokenizer or settings (exit 2, one line)."""


def manifest_path(directory: Path) -> Path:
    return Path(directory) / MANIFEST


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = manifest_path(directory)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Atomic: a crash leaves the previous manifest, never a half-written one."""
    path = manifest_path(directory)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def compare_fingerprints(expected: dict[str, Any], found: dict[str, Any], directory: Path) -> None:
    """Raise naming the first field whose value differs (teacher, tokenizer, data, settings, version)."""
    for key in sorted(set(expected) | set(found)):
        if key in expected and expected.get(key) != found.get(key):
            raise CacheMismatchError(
                f"teacher cache {directory} does not match this run: '{key}' is {found.get(key)!r} in the cache "
                f"but {expected.get(key)!r} here; rebuild it with `nlm teacher-cache` for this configuration"
            )


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type that holds every token id: int16, uint16 (vocabularies up to 65,536, such as
    SmolLM2's 49,152: 4 bytes per stored entry instead of 6), else int32. Ids are widened to int64 on read."""
    if vocab_size <= 32767:
        return torch.int16
    return torch.uint16 if vocab_size <= 65536 else torch.int32


def bytes_per_token(top_k: int, vocab_size: int) -> int:
    return top_k * (torch.tensor([], dtype=id_dtype(vocab_size)).element_size() + 2) + 4


def sampled_tail(logp: torch.Tensor, head: int, samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `head` tokens exactly, and `samples` draws (with replacement) from the rest of the distribution.

    logp: [n, V] log-probabilities at the cache's temperature. Returns ids [n, head + samples] and log-probs
    [n, head + samples] (float32): the head's own log-probs, then for each distinct drawn token
    log(T · count / samples), where T is the mass outside the head, and -inf in the slots that duplicates leave
    free (they repeat a drawn id, with no mass). The listed probabilities sum to one, and their expectation over
    the draws is the teacher's distribution token by token, so the forward-KL gradient of a student against
    them, q - p̂, is unbiased (random-sampling KD, Anshumann et al., ACL 2025); the head, kept exactly, leaves
    only the tail to be estimated. Nothing is left for a tail bucket: the caller stores its mass as zero.

    Written here because no library draws stratified (exact head, sampled tail) sparse targets for KD.
    """
    top = logp.topk(head, dim=-1)
    probs = logp.exp()
    probs.scatter_(-1, top.indices, 0.0)  # the tail's probabilities, unnormalised
    tail_mass = probs.sum(-1, keepdim=True)  # [n, 1]
    has_tail = tail_mass > 0
    draws = torch.multinomial(torch.where(has_tail, probs, torch.ones_like(probs)), samples, replacement=True,
                              generator=generator)  # [n, M]; rows without a tail draw anything, weighted 0 below
    draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = first.long().cumsum(-1) - 1  # [n, M]: index of each draw's distinct token
    counts = torch.zeros_like(draws, dtype=torch.float64).scatter_add_(-1, group, torch.ones_like(draws, dtype=torch.float64))
    distinct = torch.zeros_like(draws).scatter_(-1, group, draws)  # slot j: the j-th distinct token (0 past the last)
    used = counts > 0
    distinct = torch.where(used, distinct, draws[:, :1])  # free slots repeat a drawn id; their mass is zero
    weight = torch.log(tail_mass.double() * counts / samples).float()  # -inf where counts == 0 or no tail
    weight = torch.where(used & has_tail, weight, torch.full_like(weight, float("-inf")))
    return torch.cat([top.indices, distinct], dim=-1), torch.cat([top.values.float(), weight], dim=-1)


@dataclass
class ShardRows:
    ids: torch.Tensor  # [n, k]
    logp: torch.Tensor  # [n, k] float16
    tail_logp: torch.Tensor  # [n] float32
    offsets: torch.Tensor  # [examples + 1] int64, rows of each example within the shard
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [n, H] bfloat16 (when asked)


def save_shard(path: Path, rows: ShardRows) -> None:
    partial = path.with_suffix(".partial")
    tensors = {"ids": rows.ids.contiguous(), "logp": rows.logp.contiguous(), "tail_logp": rows.tail_logp.contiguous(),
               "offsets": rows.offsets.contiguous(), **{f"hidden.{k}": v.contiguous() for k, v in rows.hidden.items()}}
    save_file(tensors, str(partial), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(partial, path)


class TeacherCache:
    """Reads targets for examples by their index in the tokenised training data (memory-mapped shards)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(f"teacher cache {self.directory}: no {MANIFEST} (build it with `nlm teacher-cache`)")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CacheMismatchError(f"teacher cache {self.directory}: format {manifest.get('format')} v{manifest.get('version')}, "
                                     f"expected {FORMAT} v{VERSION}")
        if not manifest.get("complete"):
            raise CacheMismatchError(f"teacher cache {self.directory} is incomplete; rerun `nlm teacher-cache` to finish it")
        self.manifest = manifest
        self.top_k = int(manifest["top_k"])
        self.tail_samples = int(manifest.get("tail_samples", 0))  # of the top_k slots, drawn from the tail
        self.temperature = float(manifest["temperature"])
        self.vocab_size = int(manifest["vocab_size"])
        self._starts = [shard["first_example"] for shard in manifest["shards"]]
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    def _shard(self, number: int) -> Any:
        if number not in self._handles:
            handle = safe_open(str(self.directory / self.manifest["shards"][number]["file"]), framework="pt")
            self._handles[number] = handle
            self._offsets[number] = handle.get_tensor("offsets").tolist()
        return self._handles[number]

    def _locate(self, index: int) -> tuple[int, int]:
        number = bisect.bisect_right(self._starts, index) - 1
        if number < 0 or index >= self._starts[number] + self.manifest["shards"][number]["examples"]:
            raise IndexError(f"teacher cache {self.directory} has no example {index}")
        self._shard(number)
        return number, index - self._starts[number]

    def example_counts(self, example_indices: list[int]) -> list[int]:
        """Target tokens the cache holds for each example (from the shards' offsets)."""
        counts = []
        for index in example_indices:
            number, local = self._locate(index)
            counts.append(self._offsets[number][local + 1] - self._offsets[number][local])
        return counts

    def check_counts(self, example_indices: list[int], expected: list[int], unit: str = "target tokens") -> None:
        """Raise unless each example has as many cached rows as this run's batch has (`unit` names them).

        Example by example, every batch: equal totals could still hide rows shifted between examples."""
        for index, want, have in zip(example_indices, expected, self.example_counts(example_indices), strict=True):
            if want != have:
                raise CacheMismatchError(
                    f"teacher cache {self.directory}: example {index} has {have} cached {unit} but {want} in this "
                    "run's data; the cache was built from other data or settings: rebuild it")

    def tensor_rows(self, name: str, example_indices: list[int]) -> torch.Tensor:
        """The rows of one stored tensor for the examples, concatenated in the order given. Integer rows are
        widened to int64 before they are joined: torch cannot concatenate uint16 with other integer types."""
        parts = []
        for index in example_indices:
            number, local = self._locate(index)
            start, end = self._offsets[number][local], self._offsets[number][local + 1]
            part = self._shard(number).get_slice(name)[start:end]
            parts.append(part if part.is_floating_point() else part.to(torch.int64))
        return torch.cat(parts)

    def targets(self, example_indices: list[int], device: torch.device | str = "cpu") -> SparseTargets:
        """Targets of the examples' target tokens, concatenated in the order given (the loss's row order)."""
        return SparseTargets(
            ids=self.tensor_rows("ids", example_indices).to(device=device, dtype=torch.int64),
            logp=self.tensor_rows("logp", example_indices).to(device=device, dtype=torch.float32),
            tail_logp=self.tensor_rows("tail_logp", example_indices).to(device=device, dtype=torch.float32),
        )


def weights_fingerprint(model_path: str, revision: str | None) -> str:
    """A hub commit when the model came from the hub; else the SHA-256 of the local weight files."""
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}@{revision or 'main'}"
    digest = hashlib.sha256()
    for file in sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")) + [folder / "config.json"]):
        if file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def cache_fingerprint(config: Any, tokenizer: Any, top_k: int, tail_samples: int = 0) -> dict[str, Any]:
    """Everything the cached numbers depend on: the data files in their order (the example indices follow
    it), every tokenisation setting (max_line_bytes included: it decides which lines are skipped), the
    tokenizer and its chat template, the temperature, top-k, and — when the run names the teacher — its
    weights (a hub id and revision, or the SHA-256 of the local weight files)."""
    settings = tokenize_settings(config)
    fingerprint = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "temperature": config.distillation.temperature,
        "max_seq_length": settings.max_seq_length,
        "completion_only_loss": settings.completion_only_loss,
        "prompt_separator": settings.prompt_separator,
        "tokenize_settings": json.loads(json.dumps(asdict(settings))),  # as the manifest stores it (tuples as lists)
        "data_files": list(files_fingerprint(resolve_train_files(config.train_file)).values()),  # in order
        "top_k": top_k,
        "nlm_version": nlm.__version__,
    }
    if tail_samples:  # absent when 0, so caches built before tail sampling keep their fingerprint
        fingerprint["tail_samples"] = tail_samples
    if config.teacher_model:
        fingerprint["teacher_model"] = config.teacher_model
        fingerprint["teacher_weights"] = weights_fingerprint(config.teacher_model, config.teacher_revision)
    if config.teachers:
        fingerprint["teachers"] = [{"model": t.model, "weight": t.weight, "revision": t.revision} for t in config.teachers]
        fingerprint["teacher_mixture"] = config.distillation.teacher_mixture
    return fingerprint


def rounded_targets(top_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities [n, k] as stored (float16) and the tail bucket (float32), so that the k+1
    stored probabilities sum to one *after* the fp16 rounding.

    Each value is rounded down (never up), so the stored top-k mass never exceeds the teacher's; the tail
    is then exactly what the stored values leave (computed in float64), instead of the teacher's own tail,
    which rounding would no longer complement (peaked rows could even round past one).
    """
    stored = top_logp.to(torch.float16)
    rounded_up = stored.float() > top_logp
    stored = torch.where(rounded_up, torch.nextafter(stored, torch.full_like(stored, float("-inf"))), stored)
    left = 1 - stored.double().exp().sum(-1)
    tail = torch.log(left.clamp(min=1e-30)).float()
    return stored, tail
