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
from typing import Any

import torch
import torch.nn.functional as F

import nlm.distill.hidden_states  # noqa: F401  (registers the "hidden_states" term)
from nlm.distill.divergences import divergence_arguments, setting_names, token_divergence
from nlm.distill.targets import MixtureLogits, SparseTargets, TeacherTargets, tail_logp, target_logp
from nlm.distill.temperature import FixedTemperature, TemperaturePolicy, temperature_policy
from nlm.distill.terms import (
    TERMS,
    LossTerm,
    Scratch,  # noqa: F401  (part of the objective's gradient API: row_sums_and_gradient)
    _fresh,
    register_term,
)


@register_term("ce")
class CrossEntropyTerm(LossTerm):
    """Cross-entropy of the student against the data's labels."""

    needs = frozenset({"labels"})

    def row_sum(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student, labels, reduction="sum")

    def has_gradient_rule(self, teacher: TeacherTargets | None) -> bool:
        return True

    def row_sum_and_gradient(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor,
                             weight: float, grad: torch.Tensor | None,
                             scratch: Callable[[str, torch.Tensor], torch.Tensor] = _fresh) -> tuple[torch.Tensor, torch.Tensor]:
        # Σ -log softmax(z)[y]; ∂/∂z = softmax(z) - onehot(y), rows labelled -100 (F.cross_entropy's ignore) excluded.
        logp = torch.log_softmax(student, -1, out=scratch("ce", student))  # [c, V]
        valid = labels != -100
        labels = labels.clamp_min(0).unsqueeze(-1)  # [c, 1]
        total = -torch.where(valid, logp.gather(-1, labels).squeeze(-1), 0.0).sum()
        probs = logp.exp_()  # softmax, in the log-softmax's own buffer
        if not bool(valid.all()):
            probs.masked_fill_(~valid.unsqueeze(-1), 0.0)
        minus_one = -valid.to(probs.dtype).unsqueeze(-1)  # [c, 1]
        if grad is None:
            grad = probs.mul_(weight)
            grad.scatter_add_(-1, labels, minus_one * weight)
        else:
            grad.add_(probs, alpha=weight)
            grad.scatter_add_(-1, labels, minus_one * weight)
        return total, grad


@register_term("kd")
class DistillationTerm(LossTerm):
    """Σ_t s_t·D(teacher_t ‖ student_t) at temperature τ_t, D any registered divergence.

    With a fixed temperature s_t = 1 and the objective's weight carries τ² (today's formula, exactly);
    with an adaptive one s_t = τ_t², so the τ² scaling follows the temperature actually used per row.
    """

    needs = frozenset({"teacher"})

    def __init__(self, divergence: str = "forward_kl", temperature: TemperaturePolicy | float = 2.0,
                 **divergence_settings: float) -> None:
        divergence_arguments(divergence, divergence_settings)  # an unknown name or option fails when built
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

    def has_gradient_rule(self, teacher: TeacherTargets | None) -> bool:
        # A fixed τ; forward KL against dense logits, or any divergence over the cache's k+1 buckets.
        if not self.temperature.fixed:
            return False
        return teacher is None or isinstance(teacher, SparseTargets) or (
            isinstance(teacher, torch.Tensor | MixtureLogits) and self.divergence == "forward_kl")

    def row_sum_and_gradient(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor,
                             weight: float, grad: torch.Tensor | None,
                             scratch: Callable[[str, torch.Tensor], torch.Tensor] = _fresh) -> tuple[torch.Tensor, torch.Tensor]:
        if teacher is None:
            return student.new_zeros(()), grad if grad is not None else torch.zeros_like(student)
        tau = self.temperature.for_rows(teacher, student)
        scale = weight / tau  # ∂/∂z = (1/τ)·∂/∂(z/τ)
        scaled = torch.div(student, tau, out=scratch("kd.scaled", student))  # z/τ
        student_logp = torch.log_softmax(scaled, -1, out=scratch("kd.student", student))  # [c, V], log q
        if isinstance(teacher, SparseTargets):
            # The divergence over k+1 buckets, by autograd on the small [c, k] gathered log-probs; then the
            # chain rule through log-softmax by hand: ∂/∂u_v = Σ_i g_i·(δ(v, id_i) - q_v).
            top = student_logp.gather(-1, teacher.ids).requires_grad_(True)  # [c, k]
            with torch.enable_grad():
                buckets = torch.cat([top, tail_logp(top).unsqueeze(-1)], dim=-1)
                total = token_divergence(self.divergence, teacher.bucket_logp().to(student.dtype), buckets,
                                         **self.divergence_settings).sum()
                (grad_top,) = torch.autograd.grad(total, [top])
            probs = student_logp.exp_()  # q, in place
            coefficient = grad_top.sum(-1, keepdim=True) * -scale  # [c, 1]
            if grad is None:
                grad = probs.mul_(coefficient)
            else:
                grad.addcmul_(probs, coefficient)
            grad.scatter_add_(-1, teacher.ids, grad_top * scale)
            return total.detach(), grad
        # Forward KL Σ p·(log p - log q); ∂/∂u = q·Σp - p (log-softmax's backward, as autograd computes it).
        if isinstance(teacher, torch.Tensor):  # log p as target_logp computes it, into reused buffers
            teacher_scaled = torch.div(teacher.to(student.dtype), tau, out=scratch("kd.scaled", student))
            teacher_logp = torch.log_softmax(teacher_scaled, -1, out=scratch("kd.teacher", student))
        else:
            teacher_logp = target_logp(teacher, tau, student.dtype)  # a mixture: a new tensor
        if bool(torch.isneginf(teacher_logp.amin())):
            # -inf (no teacher mass) to the dtype's lowest: p stays exactly 0 and 0·(log p - log q) stays 0, as
            # _kl's guard makes it. Checked first (a read) because live teachers almost never have -inf.
            teacher_logp.clamp_min_(torch.finfo(teacher_logp.dtype).min)
        probs = torch.exp(teacher_logp, out=scratch("kd.scaled", student))  # p
        total = teacher_logp.sub_(student_logp).mul_(probs).sum(-1).sum()
        mass = probs.sum(-1, keepdim=True)  # [c, 1], Σp (1 up to rounding)
        student_probs = student_logp.exp_()  # q
        if grad is None:
            grad = student_probs.mul_(mass * scale)
        else:
            grad.addcmul_(student_probs, mass * scale)
        grad.add_(probs, alpha=-scale)
        return total, grad

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
    alpha: float | None = None  # the shorthand's α when built from it (the aligned engine weighs by it)

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

    def hidden_layers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Student and teacher layers whose hidden states the weighted batch terms compare."""
        terms = [t.term for t in self.batch_terms if t.weight != 0]
        return (tuple(sorted({layer for term in terms for layer in term.student_layers})),
                tuple(sorted({layer for term in terms for layer in term.teacher_layers})))

    @property
    def temperature(self) -> float | None:
        """The kd term's fixed temperature (None: no kd term, or an adaptive one)."""
        kd = next((t.term for t in self.terms if isinstance(t.term, DistillationTerm)), None)
        return kd.temperature.temperature if kd is not None and kd.temperature.fixed else None

    def term(self, name: str) -> LossTerm | None:
        return next((t.term for t in self.terms if t.term.name == name), None)

    def row_sums(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor) -> list[torch.Tensor]:
        """One sum per row term over these rows; a teacher term with weight 0 is skipped (reported as 0),
        the others are still computed for the logs."""
        return [student.new_zeros(()) if t.weight == 0 and "teacher" in t.term.needs
                else t.term.row_sum(student, teacher, labels) for t in self.row_terms]

    def has_gradient_rule(self, teacher: TeacherTargets | None) -> bool:
        """Whether every row term gives its gradient by hand for these targets (and owns no parameters)."""
        return all((t.weight == 0 and "teacher" in t.term.needs)
                   or (t.term.has_gradient_rule(teacher) and not t.term.parameters()) for t in self.row_terms)

    def row_sums_and_gradient(self, student: torch.Tensor, teacher: TeacherTargets | None, labels: torch.Tensor,
                              weights: list[float], scratch: Callable[[str, torch.Tensor], torch.Tensor] = _fresh,
                              ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`row_sums` and ∂(Σ_i weights_i·sum_i)/∂student [c, V] without autograd (needs `has_gradient_rule`).
        With a `Scratch`, the gradient lives in its buffers: valid until the next call with it."""
        sums, grad = [], None
        for t, weight in zip(self.row_terms, weights, strict=True):
            if t.weight == 0 and "teacher" in t.term.needs:
                sums.append(student.new_zeros(()))
            elif weight == 0:  # still computed for the logs, as row_sums does
                sums.append(t.term.row_sum(student, teacher, labels).detach())
            else:
                total, grad = t.term.row_sum_and_gradient(student, teacher, labels, weight, grad, scratch)
                sums.append(total)
        return sums, grad if grad is not None else torch.zeros_like(student)

    def parameters(self) -> list[torch.Tensor]:
        return [p for t in self.terms for p in t.term.parameters()]

    def with_alpha(self, alpha: float) -> Objective:
        """The same terms (shared state) with the shorthand's weights for another α: ce 1-α, kd α·τ² (α with
        an adaptive temperature); other terms keep theirs. The step policy's one override (nlm.training.policy)."""
        terms = []
        for t in self.terms:
            weight = t.weight
            if t.term.name == "ce":
                weight = 1 - alpha
            elif isinstance(t.term, DistillationTerm):
                weight = alpha * t.term.temperature.temperature**2 if t.term.temperature.fixed else alpha
            terms.append(WeightedTerm(t.term, weight))
        return Objective(terms, alpha)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The learnable parts (temperature, projections), keyed for saving apart from the student."""
        return {f"{t.term.name}.{key}": module for t in self.terms for key, module in t.term.modules().items()}

    def pop_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            out.update(t.term.pop_stats())
        return out


def shorthand(alpha: float, temperature: TemperaturePolicy | float, divergence: str = "forward_kl",
              **divergence_settings: float) -> Objective:
    """`[ce: 1-α, kd: α·τ²]` (kd weighted α with an adaptive temperature, whose τ² is per row): the one place the
    α/τ shorthand becomes terms. `divergence_settings` are the divergence's options (`distillation.*` names)."""
    policy = temperature if isinstance(temperature, TemperaturePolicy) else FixedTemperature(temperature)
    kd = DistillationTerm(divergence, policy, **divergence_settings)
    kd_weight = alpha * policy.temperature**2 if policy.fixed else alpha
    return Objective([WeightedTerm(CrossEntropyTerm(), 1 - alpha), WeightedTerm(kd, kd_weight)], alpha)


def objective_from_config(distillation: Any, hidden_sizes: Any | None = None) -> Objective:
    """The run's objective from `distillation.*`: the shorthand, plus the terms its other settings ask for
    (e.g. `hidden_states`). The one builder from the configuration."""
    objective = shorthand(distillation.alpha, temperature_policy(distillation), distillation.divergence,
                          **divergence_settings(distillation))
    hidden = getattr(distillation, "hidden_states", None)
    if hidden is not None and hidden.weight > 0:
        objective.terms.append(WeightedTerm(TERMS["hidden_states"].from_config(hidden, hidden_sizes), hidden.weight))
    return objective


def divergence_settings(distillation: Any) -> dict[str, Any]:
    """The `distillation.*` values the divergences read as options (each takes the ones it registered)."""
    return {**{name: getattr(distillation, name) for name in setting_names()},
            "divergence_options": dict(getattr(distillation, "divergence_options", None) or {})}
