"""What a teacher hands the loss for a chunk of target tokens: one of three row forms.

- a plain tensor [n, V]: the teacher's logits (a live teacher);
- `MixtureLogits`: several teachers' logits [n, V] each and their weights (an ensemble, `average`);
- `SparseTargets`: top-k log-probabilities at a fixed temperature plus the remaining mass (the cache).

`target_logp` turns dense forms into log-probabilities at a temperature (a float or a per-row [n, 1]
tensor); sparse targets are already softened and are compared over k+1 buckets by the kd term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparseTargets:
    """Teacher targets for n tokens from the cache: top-k ids, their log-probs at τ, log of the remaining mass."""

    ids: torch.Tensor  # [n, k] int64
    logp: torch.Tensor  # [n, k] float
    tail_logp: torch.Tensor  # [n] float

    def rows(self, start: int, end: int) -> SparseTargets:
        return SparseTargets(self.ids[start:end], self.logp[start:end], self.tail_logp[start:end])

    def bucket_logp(self) -> torch.Tensor:
        """[n, k+1]: the top-k log-probs and the tail bucket."""
        return torch.cat([self.logp, self.tail_logp.unsqueeze(-1)], dim=-1)


@dataclass
class MixtureLogits:
    """Several teachers' logits for the same rows; the target is Σ_i w_i·softmax(z_i/τ), formed in log space."""

    logits: list[torch.Tensor]  # one [n, V] per teacher
    weights: list[float]  # normalised to sum to 1

    def rows(self, start: int, end: int) -> MixtureLogits:
        return MixtureLogits([z[start:end] for z in self.logits], self.weights)


TeacherTargets = torch.Tensor | MixtureLogits | SparseTargets


def target_logp(target: torch.Tensor | MixtureLogits, temperature: float | torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-probabilities [n, V] of a dense target at `temperature` (float or [n, 1])."""
    if isinstance(target, MixtureLogits):
        # log Σ_i w_i p_i = logsumexp_i(log w_i + log p_i); teachers with weight 0 drop out exactly.
        parts = [F.log_softmax(z.to(dtype) / temperature, dim=-1) + math.log(w)
                 for z, w in zip(target.logits, target.weights, strict=True) if w > 0]
        return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), dim=0)
    if isinstance(target, SparseTargets):
        raise TypeError("sparse cached targets are already softened; use their buckets")
    return F.log_softmax(target.to(dtype) / temperature, dim=-1)


def tail_logp(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(top_logp)) per row: the mass outside the top-k [n, k], as log(-expm1(logsumexp)) so
    it stays accurate when the top-k hold nearly all the mass (the clamp keeps it finite when they hold all)."""
    covered = torch.logsumexp(top_logp, dim=-1).clamp(max=-1e-7)
    return torch.log(-torch.expm1(covered))


# A teacher's row source: (start, end) -> the targets of target rows [start:end] (None when no term needs them).
TeacherRows = Callable[[int, int], "TeacherTargets | None"]
