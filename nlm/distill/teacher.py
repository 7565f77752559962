"""Teachers: whatever supplies the loss's targets for the target tokens of a batch.

One protocol, `Teacher`, and its implementations: a live model (`LiveTeacher`), the offline cache
(`CachedTeacher`) and several models combined (`EnsembleTeacher`) here; the cross-tokenizer teachers
(`nlm.distill.aligned_teacher.AlignedTeacher`, `nlm.distill.cross_cache.CachedAlignedTeacher`), whose signal
is one row per text-aligned group. The trainer, the evaluation and the run wiring use only the protocol and
the capabilities it declares (`signal_kind`, `paired_tokenizer`, `batch_columns`, `live_model`, ...); they
never ask which class they hold. Which kind a run gets is decided once, in `nlm.distill.teacher_kinds`.

`signal(inputs, mask, device, layers, full_logits)` runs whatever the teacher needs once per batch and
returns a `TeacherSignal`: a row source `rows(start, end)` giving the targets of target rows [start:end]
(rows are the positions where `mask` [b, s-1] is true, in batch order), and optionally hidden states of
chosen layers for the same rows. Rows are produced chunk by chunk from the final hidden states so that
full [n, V] logits need never exist; `full_logits=True` takes the model's own logits instead (the simple
engine, and models that soft-cap or scale logits after the head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from nlm.distill.cache import CacheMismatchError, TeacherCache
from nlm.distill.targets import MixtureLogits, SparseTargets, TeacherRows, TeacherTargets
from nlm.models.heads import capture_hidden, sliced_head
from nlm.models.loading import freeze


@dataclass
class TeacherSignal:
    """What a teacher hands the loss for one batch's n target rows."""

    rows: TeacherRows  # (start, end) -> targets of rows [start:end] on the student's device
    count: int  # n
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [n, H_teacher]

    def all_rows(self) -> TeacherTargets | None:
        return self.rows(0, self.count)


@runtime_checkable
class Teacher(Protocol):
    vocab_width: int
    # What `signal` returns: "rows" (a `TeacherSignal` over the student's target rows) or "groups" (a
    # `TeacherGroups` over text-aligned groups: a teacher reading its own tokenisation). The trainer chooses
    # its loss engine from it (nlm.distill.engines).
    signal_kind: str
    # The tokenizer whose ids the teacher reads, when it is not the student's (None: the student's); the data
    # layer then adds the teacher's tokenisation and the alignment to each example.
    paired_tokenizer: Any | None
    # Dataset columns the teacher reads from each batch besides input_ids/attention_mask ("index", "teacher").
    batch_columns: tuple[str, ...]
    # Rows hold whole distributions (logits or a mixture), not top-k: eval KL and adaptive temperatures work.
    full_distribution: bool
    # `signal` scores any tokens (a model runs, in this process or behind a server), not only the dataset's
    # (a cache): on-policy steps, which train on the student's own samples, need it.
    scores_any_text: bool
    # Number of layers whose hidden states `signal` can return (0: none).
    hidden_layers: int
    # The one model it runs, which can sample sequences (on-policy / sequence-level steps) and whose revision
    # the metadata records; None for a cache or several models.
    live_model: Any | None
    # Where that model runs (None: no model of its own).
    device: torch.device | None

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherSignal: ...

    def models(self) -> list[Any]:
        """The models it runs (for checks such as `head_reproduces_logits`); empty for a cache."""
        ...

    def hidden_size(self) -> int: ...

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        """Replace each model it runs by `wrap(model)` (e.g. DeepSpeed's engine for a sharded run)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description for training_metadata.json."""
        ...

    def read_ahead(self, batches: Iterator[Any]) -> Iterator[Any]:
        """The trainer's micro-batch iterator, possibly wrapped so the teacher starts work on the next batches
        while the student computes this one (a served teacher's requests); plain teachers return it as is."""
        ...

    def close(self) -> None:
        """Release what the teacher holds beyond its models (connections, request threads) at the end of a run."""
        ...


class InProcessTeacher:
    """The defaults of a teacher that reads nothing ahead and holds nothing to release."""

    def read_ahead(self, batches: Iterator[Any]) -> Iterator[Any]:
        return batches

    def close(self) -> None:
        return None


def _identity(rows: torch.Tensor) -> torch.Tensor:
    return rows


def _layer_count(model: Any) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0) or 0)


class LiveTeacher(InProcessTeacher):
    """A frozen causal LM on its own device and dtype, run under no_grad."""

    batch_columns: tuple[str, ...] = ()
    full_distribution = True
    scores_any_text = True
    signal_kind = "rows"
    paired_tokenizer = None

    def __init__(self, model: Any, device: torch.device | str, vocab_width: int, name: str | None = None,
                 revision: str | None = None) -> None:
        self.model = freeze(model).to(device)
        self.device = torch.device(device)
        self.vocab_width = vocab_width
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.revision = revision
        self.hidden_layers = _layer_count(model)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, vocab_width] logits (padding rows of the head dropped), on the teacher's device."""
        out = self.model(input_ids=input_ids.to(self.device), use_cache=False,
                         attention_mask=attention_mask.to(self.device) if attention_mask is not None else None)
        return out.logits[..., : self.vocab_width]

    @torch.no_grad()
    def forward_rows(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, layers: Sequence[int] = (),
                     full_logits: bool = False
                     ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], dict[int, torch.Tensor]]:
        """One forward: the final hidden states of the target rows [n, H] and the head (both on the
        teacher's device), and the hidden states of `layers` at those rows. With `full_logits`, the rows
        are the model's logits [n, V] instead and the "head" is the identity."""
        attention = inputs.get("attention_mask")
        kwargs = {"input_ids": inputs["input_ids"].to(self.device), "use_cache": False, "output_hidden_states": bool(layers),
                  "attention_mask": attention.to(self.device) if attention is not None else None}
        rows_mask = mask.to(self.device)
        if full_logits:
            out = self.model(**kwargs)
            final, head = out.logits[:, :-1, : self.vocab_width][rows_mask], _identity
        else:
            with capture_hidden(self.model) as (store, _):
                out = self.model(**kwargs)
            final = store["hidden"][:, :-1][rows_mask]  # [n, H]
            head = sliced_head(self.model, self.vocab_width)  # weight[:V] only: a padded head's extra rows are never multiplied
        # hidden_states[0] is the embeddings; layer L's output is hidden_states[L + 1].
        chosen = {layer: out.hidden_states[layer + 1][:, :-1][rows_mask] for layer in layers}
        return final, head, chosen

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherSignal:
        final, head, chosen = self.forward_rows(inputs, mask, layers, full_logits)
        width = self.vocab_width

        @torch.no_grad()
        def rows(start: int, end: int) -> torch.Tensor:
            return head(final[start:end])[..., :width].to(device, non_blocking=True).float()

        return TeacherSignal(rows, final.shape[0], {k: v.to(device).float() for k, v in chosen.items()})

    @property
    def live_model(self) -> Any:
        return self.model

    def models(self) -> list[Any]:
        return [self.model]

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        self.model = wrap(self.model)

    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    # Shorthands kept for callers written before the protocol (e.g. the cross-tokenizer loss's tests).
    def row_source(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> TeacherRows:
        return self.signal(inputs, mask, device).rows

    def dense_rows(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.signal(inputs, mask, device, full_logits=True).all_rows()

    def describe(self) -> dict[str, Any]:
        return {"kind": "live", "model": self.name, "revision": self.revision, "device": str(self.device)}


class CachedTeacher(InProcessTeacher):
    """Targets read from an offline teacher cache by example index; no teacher model is loaded."""

    batch_columns = ("index",)
    full_distribution = False
    scores_any_text = False
    hidden_layers = 0
    signal_kind = "rows"
    paired_tokenizer = None
    live_model = None
    device = None

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.vocab_width = cache.vocab_size
        self.stored_layers = tuple(cache.manifest.get("hidden_layers") or ())
        self.hidden_layers = int(cache.manifest.get("teacher_num_layers", 0)) if self.stored_layers else 0

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherSignal:
        missing = sorted(set(layers) - set(self.stored_layers))
        if missing:
            raise CacheMismatchError(
                f"teacher cache {self.cache.directory} holds hidden states of teacher layers {list(self.stored_layers)}, "
                f"this run compares layers {missing} too: rebuild it with this run's distillation.hidden_states")
        targets = self.dense_rows(inputs, mask, device)
        indices = inputs["index"].tolist()
        hidden = {layer: self.cache.tensor_rows(f"hidden.{layer}", indices).to(device).float() for layer in layers}
        return TeacherSignal(targets.rows, int(targets.ids.shape[0]), hidden)

    def dense_rows(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device) -> SparseTargets:
        """The cached targets of the batch's rows, checked example by example against the batch's mask."""
        indices = inputs["index"].tolist()
        self.cache.check_counts(indices, mask.sum(1).tolist())
        return self.cache.targets(indices, device)

    def models(self) -> list[Any]:
        return []

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        return None

    def hidden_size(self) -> int:
        if not self.stored_layers:
            raise ValueError("this teacher cache holds no hidden states (build it with distillation.hidden_states set)")
        return int(self.cache.manifest["teacher_hidden_size"])

    def describe(self) -> dict[str, Any]:
        return {"kind": "cache", "teacher_cache": str(self.cache.directory),
                "teachers": self.cache.manifest.get("teachers") or [self.cache.fingerprint.get("teacher_model")]}


class EnsembleTeacher(InProcessTeacher):
    """Several live teachers sharing the student's tokenizer.

    `average`: each target row is the weighted mixture Σ_i w_i·softmax(z_i/τ) (formed in log space by the
    kd term). `route`: each example is scored by one teacher, chosen by the batch's `teacher` column (the
    member's position, from the record's `teacher` field; -1 when the record has none), else by its data
    source's name (`source_name`, from `train_mixture`) matched against the teachers' names. Teachers run
    one after another; between the forward and the loss only their final hidden states of the target rows
    are kept, and logits exist one chunk at a time.
    """

    full_distribution = True
    scores_any_text = True
    signal_kind = "rows"
    paired_tokenizer = None
    live_model = None  # several models: none samples alone
    device = None

    def __init__(self, members: list[LiveTeacher], weights: list[float], mixture: str = "average",
                 names: list[str] | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one teacher")
        if mixture not in ("average", "route"):
            raise ValueError(f"teacher_mixture {mixture!r}: expected average or route")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"teacher weights {weights}: expected non-negative weights with a positive sum")
        self.members, self.mixture = members, mixture
        self.weights = [w / total for w in weights]
        self.raw_weights = list(weights)
        self.names = list(names) if names is not None else [member.name for member in members]
        self.vocab_width = members[0].vocab_width
        self.batch_columns = ("teacher", "source_name") if mixture == "route" else ()
        self.hidden_layers = 0  # hidden states of several teachers would need one mapping each

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherSignal:
        if layers:
            raise ValueError("hidden-state distillation takes one teacher; this run has several")
        if self.mixture == "route":
            return self._routed(inputs, mask, device, full_logits)
        # One teacher at a time; only its target rows' final hidden states (or logits) are kept.
        finals = [member.forward_rows(inputs, mask, full_logits=full_logits)[:2] for member in self.members]
        width = self.vocab_width

        @torch.no_grad()
        def rows(start: int, end: int) -> MixtureLogits:
            return MixtureLogits([head(final[start:end])[..., :width].to(device).float() for final, head in finals],
                                 self.weights)

        return TeacherSignal(rows, int(mask.sum()))

    def _routed(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
                full_logits: bool) -> TeacherSignal:
        choice = self._choice(inputs).to(mask.device)  # [b]: the member scoring each example
        row_member = choice.unsqueeze(1).expand_as(mask)[mask]  # [n]: the member of each target row
        parts = []
        for number, member in enumerate(self.members):
            examples = (choice == number).nonzero().squeeze(-1)
            if examples.numel() == 0:
                continue
            sub = {key: value[examples.to(value.device)] for key, value in inputs.items()
                   if torch.is_tensor(value) and value.dim() > 0}
            final, head, _ = member.forward_rows(sub, mask[examples], full_logits=full_logits)
            positions = (row_member == number).nonzero().squeeze(-1).to(device)  # rows this member owns, in order
            parts.append((positions, final, head))
        width, count = self.vocab_width, int(mask.sum())

        @torch.no_grad()
        def rows(start: int, end: int) -> torch.Tensor:
            out = torch.empty(end - start, width, device=device)
            for positions, final, head in parts:
                inside = (positions >= start) & (positions < end)
                if inside.any():
                    local = inside.nonzero().squeeze(-1)
                    out[positions[local] - start] = head(final[local.to(final.device)])[..., :width].to(device).float()
            return out

        return TeacherSignal(rows, count)

    def _choice(self, inputs: dict[str, Any]) -> torch.Tensor:
        rows = inputs["input_ids"].shape[0]
        choice = inputs["teacher"].clone() if "teacher" in inputs else torch.full((rows,), -1, dtype=torch.long)
        sources = inputs.get("source_name")
        for row in (choice < 0).nonzero().squeeze(-1).tolist():
            source = sources[row] if sources is not None else None
            if source not in self.names:
                raise ValueError(f"teacher_mixture=route: an example has no 'teacher' field and its data source "
                                 f"{source!r} is not one of the teachers' names {self.names}")
            choice[row] = self.names.index(source)
        if choice.numel() and int(choice.max()) >= len(self.members):
            raise ValueError(f"teacher index {choice.tolist()} out of range for {len(self.members)} teachers")
        return choice

    def models(self) -> list[Any]:
        return [member.model for member in self.members]

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        for member in self.members:
            member.wrap_models(wrap)

    def hidden_size(self) -> int:
        raise ValueError("hidden-state distillation takes one teacher; this run has several")

    def describe(self) -> dict[str, Any]:
        return {"kind": "ensemble", "teacher_mixture": self.mixture,
                "teachers": [{**member.describe(), "weight": weight}
                             for member, weight in zip(self.members, self.raw_weights, strict=True)]}


__all__ = ["CachedTeacher", "EnsembleTeacher", "LiveTeacher", "SparseTargets", "Teacher", "TeacherSignal"]
