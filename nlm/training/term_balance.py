"""A warning when one loss term outweighs the others by orders of magnitude at the start of training.

A term whose magnitude depends on the model (a raw hidden-state MSE on a real model's residual stream is
thousands per token, CE a few nats) leaves the other terms almost no gradient once the gradient is clipped,
and the run silently becomes a run of that term alone. Checked once, on the first batch; a warning, not an
error, since a user may mean it.
"""

from __future__ import annotations

import logging

from nlm.distill.loss import LossParts
from nlm.distill.objective import Objective

logger = logging.getLogger("nlm.training")

RATIO = 100.0  # "orders of magnitude": the largest weighted term against all the others together


def unbalanced_term(objective: Objective, parts: LossParts, ratio: float = RATIO) -> str | None:
    """The warning for these parts (per-token means of each term), or None when no term dominates."""
    weighted = {t.term.name: abs(t.weight * float(parts.terms[t.term.name]))
                for t in objective.terms if t.weight != 0 and t.term.name in parts.terms}
    if len(weighted) < 2:
        return None
    name = max(weighted, key=weighted.__getitem__)
    others = sum(value for key, value in weighted.items() if key != name)
    if weighted[name] < ratio * max(others, 1e-12):
        return None
    shown = ", ".join(f"{key} {value:.4g}" for key, value in weighted.items() if key != name)
    return (f"loss term {name} is {weighted[name] / max(others, 1e-12):,.0f}x the other terms together at the start "
            f"of training (weighted per token: {name} {weighted[name]:.4g}; {shown}): they get almost no gradient; "
            f"lower its weight or use a scale-free form of it")


def warn_unbalanced_terms(objective: Objective, parts: LossParts) -> None:
    message = unbalanced_term(objective, parts)
    if message is not None:
        logger.warning(message)
