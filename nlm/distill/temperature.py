"""The temperature of the kd term: fixed (the default), per-token from the teacher's entropy, or learned.

- `fixed`: τ from `distillation.temperature`, the same for every row (the objective's weight carries τ²).
- `entropy`: per token, the τ at which the teacher's softened distribution has entropy
  `distillation.target_entropy` (nats), found by bisection (entropy rises with τ), bounded by
  `temperature_min/max`. Per token rather than per example because a sequence mixes confident and open
  positions; a per-example τ would soften the confident ones as much as the open ones.
- `learned`: one scalar τ = τ_min + (τ_max - τ_min)·sigmoid(θ), θ trained with the student. Left alone,
  minimising the loss would drive τ to whichever bound makes the two distributions look most alike, so
  its gradient is reversed (as in curriculum temperature distillation, CTKD): τ moves to where the
  student's mismatch is largest, the student learns to close it, and the sigmoid keeps τ inside the bounds.

Each policy returns a float or a per-row [c, 1] tensor and records mean/min/max for the logs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nlm.distill.targets import MixtureLogits, SparseTargets, TeacherTargets, target_logp


class TemperaturePolicy:
    fixed: bool = False

    def __init__(self) -> None:
        self._stats = {"sum": 0.0, "count": 0, "min": math.inf, "max": -math.inf}

    def for_rows(self, teacher: TeacherTargets, student: torch.Tensor) -> float | torch.Tensor:
        raise NotImplementedError

    def learnable(self) -> list[torch.Tensor]:
        return []

    def _record(self, tau: torch.Tensor) -> None:
        values = tau.detach().float().reshape(-1)
        if values.numel():
            self._stats["sum"] += values.sum().item()
            self._stats["count"] += values.numel()
            self._stats["min"] = min(self._stats["min"], values.min().item())
            self._stats["max"] = max(self._stats["max"], values.max().item())

    def pop_stats(self) -> dict[str, float]:
        stats, self._stats = self._stats, {"sum": 0.0, "count": 0, "min": math.inf, "max": -math.inf}
        if not stats["count"]:
            return {}
        return {"temperature_mean": stats["sum"] / stats["count"], "temperature_min": stats["min"],
                "temperature_max": stats["max"]}


class FixedTemperature(TemperaturePolicy):
    fixed = True

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def for_rows(self, teacher: TeacherTargets, student: torch.Tensor) -> float:
        return self.temperature

    def pop_stats(self) -> dict[str, float]:
        return {}  # constant: the config says it


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) per row of log-probabilities [n, V] -> [n]."""
    return -(logp.exp() * logp).nan_to_num(0.0).sum(-1)


@torch.no_grad()
def entropy_temperature(teacher: torch.Tensor | MixtureLogits, target: float, low: float, high: float,
                        iterations: int = 30) -> torch.Tensor:
    """Per row, τ in [low, high] with H(teacher at τ) = target (bisection in log τ); [n, 1].

    Rows whose entropy stays below (above) the target even at `high` (`low`) get the bound.
    """
    rows = teacher.logits[0].shape[0] if isinstance(teacher, MixtureLogits) else teacher.shape[0]
    device = teacher.logits[0].device if isinstance(teacher, MixtureLogits) else teacher.device
    lo = torch.full((rows, 1), math.log(low), device=device)
    hi = torch.full((rows, 1), math.log(high), device=device)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        too_sharp = entropy(target_logp(teacher, mid.exp())) < target  # [n]
        lo = torch.where(too_sharp.unsqueeze(-1), mid, lo)
        hi = torch.where(too_sharp.unsqueeze(-1), hi, mid)
    return ((lo + hi) / 2).exp()


class EntropyTemperature(TemperaturePolicy):
    def __init__(self, target_entropy: float, low: float, high: float) -> None:
        super().__init__()
        self.target_entropy, self.low, self.high = target_entropy, low, high

    def for_rows(self, teacher: TeacherTargets, student: torch.Tensor) -> torch.Tensor:
        if isinstance(teacher, SparseTargets):
            raise ValueError("temperature_mode=entropy needs the teacher's full logits; a teacher cache stores "
                             "top-k log-probabilities at one temperature")
        tau = entropy_temperature(teacher, self.target_entropy, self.low, self.high).to(student.dtype)
        self._record(tau)
        return tau


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class LearnedTemperature(TemperaturePolicy, torch.nn.Module):
    def __init__(self, initial: float, low: float, high: float) -> None:
        torch.nn.Module.__init__(self)
        TemperaturePolicy.__init__(self)
        if not low < initial < high:
            raise ValueError(f"temperature {initial} must lie strictly between temperature_min {low} and temperature_max {high}")
        self.low, self.high = low, high
        fraction = (initial - low) / (high - low)
        self.logit = torch.nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction))))

    def value(self) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self.logit)

    def for_rows(self, teacher: TeacherTargets, student: torch.Tensor) -> torch.Tensor:
        if isinstance(teacher, SparseTargets):
            raise ValueError("temperature_mode=learned needs the teacher's full logits; a teacher cache stores "
                             "top-k log-probabilities at one temperature")
        tau = _ReverseGradient.apply(self.value()).to(device=student.device, dtype=student.dtype)
        self._record(tau)
        return tau.reshape(1, 1)

    def learnable(self) -> list[torch.Tensor]:
        return [self.logit]


def temperature_policy(distillation: Any) -> TemperaturePolicy:
    """The policy named by `distillation.temperature_mode` (absent = fixed)."""
    mode = getattr(distillation, "temperature_mode", "fixed")
    if mode == "fixed":
        return FixedTemperature(distillation.temperature)
    low, high = distillation.temperature_min, distillation.temperature_max
    if mode == "entropy":
        return EntropyTemperature(distillation.target_entropy, low, high)
    if mode == "learned":
        return LearnedTemperature(distillation.temperature, low, high)
    raise ValueError(f"unknown temperature_mode {mode!r}; expected fixed, entropy or learned")
