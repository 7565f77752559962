"""The objective: a weighted list of registered loss terms, apart from the engine that evaluates it.

    total = Σ_i weight_i · (Σ over target tokens of term_i) / normaliser

Two kinds of term:
- row terms (`ce`, `kd`, ...) see a chunk of the student's logits [c, V], the teacher's targets for the same
  rows and their labels, and return a sum over the rows. The fused engine evaluates them chunk by chunk
  without full logits, the simple engine on all rows at once; a row term that cannot be chunked sets
  `fused = False` and the run uses the simple engine.
- batch terms (`hidden_states`) see per-layer hidden states of the target rows and run outside either engine.

`alpha`/`temperature`/`divergence` stay the shorthand: `[ce: 1-α, kd: α·τ²]` (`objective_from_config`).
A new term is a class registered with `@register_term("name")`; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from nlm.distill.divergences import token_divergence
from nlm.distill.targets import SparseTargets, TeacherTargets, tail_logp, target_logp
from nlm.distill.temperature import FixedTemperature, TemperaturePolicy, temperature_policy


class LossTerm:
    """Base of every term. `needs` names what the term reads: labels, teacher (targets), hidden_states."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = "rows"  # "rows" (per chunk of logits) or "batch" (hidden states)
    fused: ClassVar[bool] = True  # can the fused engine evaluate it chunk by chunk?

    def row_sum(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> torch.Tensor:
        """Σ over the chunk's rows; student [c, V] logits in fp32/fp64, labels [c]."""
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


@register_term("ce")
class CrossEntropyTerm(LossTerm):
    """Cross-entropy of the student against the data's labels."""

    needs = frozenset({"labels"})

    def row_sum(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student, labels, reduction="sum")


@register_term("kd")
class DistillationTerm(LossTerm):
    """Σ_t s_t·D(teacher_t ‖ student_t) at temperature τ_t, D any registered divergence.

    With a fixed temperature s_t = 1 and the objective's weight carries τ² (today's formula, exactly);
    with an adaptive one s_t = τ_t², so the τ² scaling follows the temperature actually used per row.
    """

    needs = frozenset({"teacher"})

    def __init__(self, divergence: str = "forward_kl", temperature: TemperaturePolicy | float = 2.0,
                 **divergence_settings: float) -> None:
        self.divergence = divergence
        self.temperature = temperature if isinstance(temperature, TemperaturePolicy) else FixedTemperature(temperature)
        self.divergence_settings = divergence_settings

    def row_sum(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return student.new_zeros(())
        tau = self.temperature.for_rows(teacher, student)  # a float, or [c, 1]
        student_logp = F.log_softmax(student / tau, dim=-1)
        if isinstance(teacher, SparseTargets):
            # Both distributions coarsened to k+1 buckets (the teacher's top-k tokens and "everything else").
            top = student_logp.gather(-1, teacher.ids)  # [c, k]
            student_logp = torch.cat([top, tail_logp(top).unsqueeze(-1)], dim=-1)
            teacher_logp = teacher.bucket_logp().to(student.dtype)
        else:
            teacher_logp = target_logp(teacher, tau, student.dtype)
        per_token = token_divergence(self.divergence, teacher_logp, student_logp, **self.divergence_settings)
        if not self.temperature.fixed:
            per_token = per_token * tau.detach().squeeze(-1) ** 2
        return per_token.sum()

    def parameters(self) -> list[torch.Tensor]:
        return self.temperature.learnable()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"temperature": self.temperature} if isinstance(self.temperature, torch.nn.Module) else {}

    def pop_stats(self) -> dict[str, float]:
        return self.temperature.pop_stats()


@dataclass
class WeightedTerm:
    term: LossTerm
    weight: float


@dataclass
class Objective:
    """The weighted terms of one run's loss."""

    terms: list[WeightedTerm] = field(default_factory=list)

    @property
    def row_terms(self) -> list[WeightedTerm]:
        return [t for t in self.terms if t.term.kind == "rows"]

    @property
    def batch_terms(self) -> list[WeightedTerm]:
        return [t for t in self.terms if t.term.kind == "batch"]

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(t.term.needs for t in self.terms if t.weight != 0))

    @property
    def fused_supported(self) -> bool:
        return all(t.term.fused for t in self.row_terms)

    def term(self, name: str) -> LossTerm | None:
        return next((t.term for t in self.terms if t.term.name == name), None)

    def row_sums(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> list[torch.Tensor]:
        """One sum per row term over these rows; a teacher term with weight 0 is skipped (reported as 0),
        the others are still computed for the logs."""
        return [student.new_zeros(()) if t.weight == 0 and "teacher" in t.term.needs
                else t.term.row_sum(student, teacher, labels) for t in self.row_terms]

    def parameters(self) -> list[torch.Tensor]:
        return [p for t in self.terms for p in t.term.parameters()]

    def with_alpha(self, alpha: float, temperature: float) -> Objective:
        """The same terms (shared state) with the shorthand's weights for another α: ce 1-α, kd α·τ² (α with
        an adaptive temperature); other terms keep theirs."""
        terms = []
        for t in self.terms:
            weight = t.weight
            if t.term.name == "ce":
                weight = 1 - alpha
            elif isinstance(t.term, DistillationTerm):
                weight = alpha * temperature**2 if t.term.temperature.fixed else alpha
            terms.append(WeightedTerm(t.term, weight))
        return Objective(terms)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The learnable parts (temperature, projections), keyed for saving apart from the student."""
        return {f"{t.term.name}.{key}": module for t in self.terms for key, module in t.term.modules().items()}

    def pop_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            out.update(t.term.pop_stats())
        return out


def objective_from_config(distillation: Any, hidden_sizes: tuple[int, int] | None = None) -> Objective:
    """The shorthand `[ce: 1-α, kd: α·τ²]` from `distillation.*` (α·1 with an adaptive temperature), plus the
    terms its other settings ask for (e.g. `hidden_states`)."""
    policy = temperature_policy(distillation)
    kd = DistillationTerm(distillation.divergence, policy, jsd_beta=distillation.jsd_beta,
                          skew_lambda=distillation.skew_lambda)
    kd_weight = distillation.alpha * distillation.temperature**2 if policy.fixed else distillation.alpha
    terms = [WeightedTerm(CrossEntropyTerm(), 1 - distillation.alpha), WeightedTerm(kd, kd_weight)]
    hidden = getattr(distillation, "hidden_states", None)
    if hidden is not None and hidden.weight > 0:
        if "hidden_states" not in TERMS:  # registered by its module on import
            import nlm.distill.hidden_states  # noqa: F401
        terms.append(WeightedTerm(TERMS["hidden_states"].from_config(hidden, hidden_sizes), hidden.weight))
    return Objective(terms)
