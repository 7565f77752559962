"""The `hidden_states` term: layer-wise distillation of intermediate representations.

For each pair (student layer s → teacher layer t) the student's hidden state at every target token is
mapped to the teacher's width by a learned linear projection (only when the widths differ) and compared
with the teacher's, scale-free by construction (issue 24):

- mse: per target row, the squared error divided by the teacher row's square norm,
  Σ_d (h - t)² / Σ_d t²: a relative error, 1 for a student that outputs zeros, 0 on a match, unchanged
  when both sides are scaled. Per row (not per batch), so a row's value does not depend on the other rows:
  gradient accumulation and several processes give the same loss as one large batch, and the few tokens
  with outsized residual norms (attention sinks) weigh no more than any other. The raw residual stream
  of a real model has a mean square of thousands (SmolLM2-135M: ~4,500 per token at the start of
  training against ~14 for CE), so a raw MSE drowned the logit terms; normalised, it is of the order of CE/KD at any model size. Dividing by the
  teacher's norm (not each side by its own, which would be the cosine) keeps the magnitude information.
- cosine: 1 - cos(h, t) per row, direction only.

The term is the mean over layer pairs, summed over target tokens like every other term, so the run's
normaliser applies.

Only target positions count (label != -100, the rows the logit terms use): a teacher cache stores exactly
those rows, prompts are not what the student is trained to produce, and it keeps the term's weight
comparable to CE/KD per token. Layers are 0-based; layer L is `hidden_states[L + 1]` of transformers
(index 0 is the embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nlm.distill.terms import LossTerm, register_term


@dataclass(frozen=True)
class HiddenShapes:
    student_layers: int
    student_width: int
    teacher_layers: int
    teacher_width: int


    kept_layers: tuple[int, ...] | None = None  # teacher layers an `nlm init-student` student was cut from


def auto_layer_map(student_layers: int, teacher_layers: int, kept_layers: tuple[int, ...] | None = None) -> dict[int, int]:
    """Student layer -> teacher layer whose output it should reproduce.

    For a student cut from this teacher (`kept_layers`, recorded by `nlm init-student`): student layer i is
    teacher layer kept[i], and it stands for the dropped layers after it, so it maps to the teacher layer just
    before the next kept one (kept[i+1] - 1; the last to the teacher's last): its output is then what the next
    kept layer was trained to read. Otherwise the student layers are spread evenly: student i ↦ teacher
    round((i+1)·T/S) - 1 (for an evenly cut student both give the same map)."""
    if kept_layers is not None and len(kept_layers) == student_layers and max(kept_layers, default=-1) < teacher_layers:
        ends = [*kept_layers[1:], teacher_layers]
        return {i: ends[i] - 1 for i in range(student_layers)}
    return {i: max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)}


@register_term("hidden_states")
class HiddenStatesTerm(LossTerm):
    needs = frozenset({"teacher", "hidden_states"})
    kind = "batch"

    def __init__(self, layers: dict[int, int], loss: str, student_width: int, teacher_width: int) -> None:
        if loss not in ("mse", "cosine"):
            raise ValueError(f"hidden_states.loss {loss!r}: expected mse or cosine")
        self.layers = dict(sorted(layers.items()))
        self.loss = loss
        self.projections = torch.nn.ModuleDict()
        if student_width != teacher_width:
            for student_layer in self.layers:
                projection = torch.nn.Linear(student_width, teacher_width, bias=False)
                torch.nn.init.normal_(projection.weight, std=student_width**-0.5)
                self.projections[str(student_layer)] = projection

    @classmethod
    def from_config(cls, config: Any, shapes: HiddenShapes | None) -> HiddenStatesTerm:
        if shapes is None:
            raise ValueError("distillation.hidden_states needs a live teacher with hidden states")
        layers = (auto_layer_map(shapes.student_layers, shapes.teacher_layers, shapes.kept_layers)
                  if config.layers == "auto" else dict(config.layers))
        for student_layer, teacher_layer in layers.items():
            if not 0 <= student_layer < shapes.student_layers:
                raise ValueError(f"distillation.hidden_states.layers: student layer {student_layer} is outside 0..{shapes.student_layers - 1}")
            if not 0 <= teacher_layer < shapes.teacher_layers:
                raise ValueError(f"distillation.hidden_states.layers: teacher layer {teacher_layer} is outside 0..{shapes.teacher_layers - 1}")
        if not layers:
            raise ValueError("distillation.hidden_states.layers is empty")
        return cls(layers, config.loss, shapes.student_width, shapes.teacher_width)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.layers.values())))

    def batch_sum(self, student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]) -> torch.Tensor:
        """Σ over target rows of the mean over layer pairs; student[s] [n, Hs], teacher[t] [n, Ht]."""
        total = None
        for student_layer, teacher_layer in self.layers.items():
            hidden = student[student_layer].float()
            key = str(student_layer)
            if key in self.projections:
                projection = self.projections[key]
                hidden = F.linear(hidden, projection.weight.float())
            target = teacher[teacher_layer].to(hidden.device, torch.float32)
            if self.loss == "mse":  # relative to the teacher row's mean square (no gradient: the teacher's)
                per_row = (hidden - target).pow(2).mean(-1) / target.pow(2).mean(-1).clamp_min(1e-12)
            else:
                per_row = 1 - F.cosine_similarity(hidden, target, dim=-1, eps=1e-6)
            total = per_row.sum() if total is None else total + per_row.sum()
        assert total is not None
        return total / len(self.layers)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.projections.parameters())

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"projections": self.projections} if len(self.projections) else {}
