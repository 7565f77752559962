"""The base of every loss term and their registry (`register_term`), apart from the objective that weighs
them (`nlm.distill.objective`), so a term's own module (e.g. `hidden_states`) imports only this."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from nlm.distill.targets import TeacherTargets


class Scratch:
    """Reusable [c, V] buffers for the chunks of one loss evaluation, by name.

    Each temporary of the hand-written gradients is allocated once per loss call, not once per chunk: a
    fresh 16 MiB+ block comes from the OS (glibc maps and unmaps blocks that large), and faulting its pages
    in cost as much CPU time as the arithmetic on it. Later (smaller) chunks use the front of the buffer.
    A tensor handed out is valid until the same name is asked for again.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < like.numel() or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)


def _fresh(name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like)


class LossTerm:
    """Base of every term. `needs` names what the term reads: labels, teacher (targets), hidden_states."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = "rows"  # "rows" (per chunk of logits) or "batch" (hidden states)
    fused: ClassVar[bool] = True  # can the fused engine evaluate it chunk by chunk?
    # A batch term's layers whose hidden states it compares (0-based; none for row terms).
    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()

    def row_sum(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> torch.Tensor:
        """Σ over the chunk's rows; student [c, V] logits in fp32/fp64, labels [c]."""
        raise NotImplementedError

    def has_gradient_rule(self, teacher: TeacherTargets | None) -> bool:
        """Whether `row_sum_and_gradient` can give this term's gradient by hand for these targets."""
        return False

    def row_sum_and_gradient(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor,
                             weight: float, grad: torch.Tensor | None,
                             scratch: Callable[[str, torch.Tensor], torch.Tensor] = _fresh) -> tuple[torch.Tensor, torch.Tensor]:
        """`row_sum` and weight·∂(row_sum)/∂student [c, V], added into `grad` in place (or, when `grad` is
        None, a tensor from `scratch`). Same values as autograd through `row_sum`, with fewer passes over
        [c, V] and no autograd graph: the fused engine's per-chunk cost outside the head products is memory
        traffic over the chunk's logits. Temporaries come from `scratch` (see `Scratch`)."""
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        """Learnable tensors the term owns (they train with the student)."""
        return []

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def pop_stats(self) -> dict[str, float]:
        """Figures to log since the last call (e.g. the temperature used)."""
        return {}


TERMS: dict[str, Callable[..., LossTerm]] = {}


def register_term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: the term becomes selectable by name in an objective."""

    def add(cls: type[LossTerm]) -> type[LossTerm]:
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is already registered")
        cls.name = name
        TERMS[name] = cls
        return cls

    return add
