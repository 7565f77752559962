"""The interface every loss engine implements, and the pieces they share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nlm.distill.loss import LossParts, add_batch_terms
from nlm.distill.objective import Objective
from nlm.distill.teacher import Teacher, TeacherSignal


def _nothing() -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class EngineContext:
    """What the engines need of the run, fixed when the trainer is built."""

    vocab_width: int  # the width both heads are compared over (padding rows dropped)
    chunk_tokens: int | None = None  # rows per chunk; None: by vocabulary and device (engines.chunks)
    unwrap: Callable[[Any], Any] = lambda model: model  # the student under DDP/DeepSpeed wrappers
    autocast: Callable[[], AbstractContextManager] = _nothing  # the run's mixed precision for chunk products
    teacher_heads: Callable[[], AbstractContextManager] = _nothing  # whole teacher heads under ZeRO-3


@dataclass
class EngineStep:
    """One batch's loss and what the trainer logs from it."""

    parts: LossParts
    outputs: Any  # the student's forward outputs
    logits: Callable[[int, int], torch.Tensor]  # detached student logits [end-start, V] of target rows [start:end]
    extra: dict[str, Any] = field(default_factory=dict)


class LossEngine(Protocol):
    name: str

    def step(self, model: Any, inputs: dict[str, torch.Tensor], objective: Objective, teacher: Teacher | None,
             normalizer: Any) -> EngineStep:
        """The batch's loss: `objective` over `inputs`' target tokens, normalised by `normalizer` (the target
        count of the whole optimiser step; None: this batch's)."""
        ...


def target_rows(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The [b, s-1] mask of target positions (after the causal shift) and their [n] labels."""
    shifted = inputs["labels"][:, 1:]  # [b, s-1]
    mask = shifted != -100
    return mask, shifted[mask]


def student_forward(inputs: dict[str, torch.Tensor], hidden_states: bool) -> dict[str, Any]:
    forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "use_cache": False}
    if hidden_states:
        forward["output_hidden_states"] = True
    return forward


def with_batch_terms(objective: Objective, parts: LossParts, outputs: Any, mask: torch.Tensor, layers: tuple[int, ...],
                     signal: TeacherSignal | None, normalizer: Any) -> LossParts:
    """The objective's batch terms (per-layer hidden states of the target rows) added to the row terms' parts."""
    if not layers or signal is None:
        return parts
    # hidden_states[L + 1] is layer L's output; rows as for the logits: [n, H] per layer
    chosen = {layer: outputs.hidden_states[layer + 1][:, :-1][mask] for layer in layers}
    return add_batch_terms(objective, parts, chosen, signal.hidden, normalizer)


def linear_parts(head_module: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain Linear head, which gets hand-written gradients (no head-sized copy per chunk)."""
    return (head_module.weight, head_module.bias) if type(head_module) is torch.nn.Linear else None
