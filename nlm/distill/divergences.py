"""Per-token divergences between a teacher distribution p and a student distribution q, in log space.

Each function takes log-probabilities `teacher_logp` and `student_logp` of shape [n, v] (already
temperature-scaled, in fp32 or fp64) and returns a [n] tensor. Written by hand because no maintained
library offers all five with safe handling of zero teacher mass; the forms follow the usual definitions
(generalised JSD as in GKD, skew KL as in DistiLLM).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RegisteredDivergence:
    function: Callable[..., torch.Tensor]  # (teacher_logp [n, v], student_logp [n, v], **options) -> [n]
    options: dict[str, str] = field(default_factory=dict)  # the function's keyword -> its `distillation.*` field
    # The function's other keywords -> their defaults: set by `distillation.divergence_options: {keyword: value}`.
    free: dict[str, float] = field(default_factory=dict)


REGISTRY: dict[str, RegisteredDivergence] = {}


def register_divergence(name: str, **options: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: make `function(teacher_logp, student_logp, **options)` selectable as `distillation.divergence: name`.

    `options` maps a keyword of the function to the `distillation.*` setting that supplies it, e.g.
    `register_divergence("jsd", beta="jsd_beta")`. Every other keyword with a default is an option of its own,
    set by `distillation.divergence_options: {keyword: value}`: a new divergence and its options live here only
    (`nlm.config.settings` reads the registered names from this file, so `distillation.divergence` accepts it).
    """

    def add(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in REGISTRY:
            raise ValueError(f"divergence {name!r} is already registered")
        free = {param.name: param.default for param in list(inspect.signature(function).parameters.values())[2:]
                if param.name not in options and param.default is not inspect.Parameter.empty}
        REGISTRY[name] = RegisteredDivergence(function, dict(options), free)
        return function

    return add


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row; positions where p has no mass contribute 0 even when log p is -inf."""
    p = p_logp.exp()
    terms = torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p))
    return terms.sum(-1)


def _floor(logp: torch.Tensor) -> torch.Tensor:
    # -inf log-probs (a teacher with exactly zero mass) would make q-weighted terms inf or NaN; the floor
    # stands for "as unlikely as this dtype can say" and only changes cases whose true value is infinite.
    return logp.clamp_min(math.log(torch.finfo(logp.dtype).tiny))


@register_divergence("forward_kl")
def forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mass-covering; the student is pushed to cover every token the teacher likes."""
    return _kl(teacher_logp, student_logp)


@register_divergence("reverse_kl")
def reverse_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mode-seeking; the student is pushed off tokens the teacher rules out."""
    return _kl(student_logp, _floor(teacher_logp))


def _mixture_logp(a_logp: torch.Tensor, b_logp: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1-w)·b), computed without leaving log space."""
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


@register_divergence("jsd", beta="jsd_beta")
def jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon: β·KL(p || m) + (1-β)·KL(q || m) with m = β·p + (1-β)·q."""
    mixture = _mixture_logp(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)


@register_divergence("tvd")
def tvd(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Total variation: half the L1 distance between the two distributions."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


@register_divergence("skew_kl", skew="skew_lambda")
def skew_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew KL: KL(p || λ·p + (1-λ)·q); λ=0 is forward KL, and λ>0 bounds it when q misses p's mass."""
    if skew == 0:
        return _kl(teacher_logp, student_logp)
    return _kl(teacher_logp, _mixture_logp(teacher_logp, student_logp, skew))


def divergence_arguments(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The keywords `kind`'s function gets from `distillation.*` values (`settings`: jsd_beta, skew_lambda, ...,
    and `divergence_options`), with the defaults when absent; an option it does not take is an error."""
    entry = REGISTRY.get(kind)
    if entry is None:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(REGISTRY)}")
    options = dict(settings.get("divergence_options") or {})
    unknown = sorted(set(options) - set(entry.free))
    if unknown:
        raise ValueError(f"distillation.divergence_options {unknown} are not options of {kind}; "
                         f"expected {sorted(entry.free) or 'none'}")
    settings = {"jsd_beta": 0.5, "skew_lambda": 0.1, **settings}
    return {**{param: settings[name] for param, name in entry.options.items()},
            **{param: options.get(param, default) for param, default in entry.free.items()}}


def token_divergence(kind: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor, **settings: Any) -> torch.Tensor:
    """Look the divergence up by name (the names of `distillation.divergence`) and apply it per row.

    `settings` are `distillation.*` values (jsd_beta, skew_lambda, divergence_options, ...); each divergence
    takes the ones it registered, with the defaults when absent.
    """
    arguments = divergence_arguments(kind, settings)  # an unknown name fails here
    return REGISTRY[kind].function(teacher_logp, student_logp, **arguments)


def setting_names() -> tuple[str, ...]:
    """Every `distillation.*` field a registered divergence reads."""
    return tuple(dict.fromkeys(name for entry in REGISTRY.values() for name in entry.options.values()))


DIVERGENCES = tuple(REGISTRY)  # the built-in names, in registration order
