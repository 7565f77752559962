"""What an optimiser step trains on: the dataset's completions (off-policy), the student's own samples
(on-policy distillation, GKD: Agarwal et al. 2024) or the teacher's samples (sequence-level KD: Kim & Rush 2016).

The trainer calls `StepPolicy.prepare` once per optimiser step with all its gradient-accumulation
micro-batches, before the step's target tokens are counted; the policy decides the step's source and, for
generated sources, replaces each row's completion by a sampled one:

    row:    [prompt tokens | completion ... EOS | padding]
    labels: [-100 ...      | completion ... EOS | -100 ...]    (the prompt is never a target; EOS is)

All micro-batches of a step share one source and one `generate` call. Under DDP each rank generates for its
own shard (the unwrapped model generates, so no collective runs). With no generation configured
(`lmbda == 0` and not `seq_kd`) there is no policy at all and the trainer runs exactly as before.

Which steps are on-policy is a fixed schedule, not a coin flip (TRL draws `random() <= lmbda`): step s is
on-policy when floor((s+1)·λ) > floor(s·λ), so the share is λ up to rounding at every point of the run, the
same on every rank, and a resumed run continues the same schedule.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch

from nlm.config.settings import DistillationConfig
from nlm.data.tokenize import IGNORE_INDEX
from nlm.distill.teacher import Teacher
from nlm.models.sampling import SamplingSettings, sample_completions, stop_token_ids

logger = logging.getLogger(__name__)

Source = Literal["data", "student", "teacher"]


def on_policy_steps(steps: int, lmbda: float) -> int:
    """How many of the first `steps` optimiser steps the schedule makes on-policy."""
    return math.floor(round(steps * lmbda, 9))


def prompt_length(labels: torch.Tensor, attention: torch.Tensor | None) -> int:
    """Tokens before the first target of one row (at least 1: a row that is all target keeps its first token)."""
    targets = (labels != IGNORE_INDEX).nonzero()
    first = int(targets[0]) if len(targets) else int(attention.sum()) if attention is not None else labels.numel()
    return max(first, 1)


def rebuild_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, like: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + completion; labels cover the completion only (EOS included)."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    labels = torch.full((len(prompts), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor(prompt + completion)
        attention[row, :end] = 1
        labels[row, len(prompt):end] = torch.tensor(completion)
    return {"input_ids": input_ids.to(like.device), "attention_mask": attention.to(like.device),
            "labels": labels.to(like.device)}


class StepPolicy:
    """Decides each optimiser step's source and generates its completions; keeps the figures it logs."""

    def __init__(self, config: DistillationConfig, *, seed: int, pad_id: int, tokenizer: Any, teacher: Teacher | None) -> None:
        # On-policy steps need a teacher that scores any text (live, or served: the server scores the student's
        # samples); sequence-level KD needs one that writes text (a live model).
        if config.seq_kd and (teacher is None or teacher.live_model is None):
            raise ValueError("sequence-level distillation needs a live teacher model")
        if config.lmbda > 0 and (teacher is None or teacher.live_model is None and not teacher.scores_any_text):
            raise ValueError("on-policy distillation needs a live or served teacher")
        self.lmbda, self.seq_kd, self.seed, self.pad_id = config.lmbda, config.seq_kd, seed, pad_id
        self.tokenizer, self.teacher = tokenizer, teacher
        self.sampling = SamplingSettings(config.max_new_tokens, config.generation_temperature, config.generation_top_p,
                                         config.generation_top_k)
        self.steps = self.on_policy = 0
        self._started_at: int | None = None
        self.window = self._new_window()

    @classmethod
    def from_config(cls, config: DistillationConfig, **kwargs: Any) -> StepPolicy | None:
        """The policy, or None when every step trains on the dataset (today's path, untouched)."""
        return cls(config, **kwargs) if config.lmbda > 0 or config.seq_kd else None

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"sequences": 0, "generated": 0, "seconds": 0.0}

    def source(self, step: int) -> Source:
        """Step `step` (0-based)'s source: student on the λ schedule, else teacher with seq_kd, else the data."""
        if on_policy_steps(step + 1, self.lmbda) > on_policy_steps(step, self.lmbda):
            return "student"
        return "teacher" if self.seq_kd else "data"

    @staticmethod
    def alpha(source: Source) -> float | None:
        """The only part of the objective a step source overrides: its α (None: the run's objective as built).

        On the student's own samples the label is the student's own token: a CE term would reinforce it, so an
        on-policy step is pure divergence (as in GKD). Teacher samples keep the configured mix (Kim & Rush)."""
        return 1.0 if source == "student" else None

    def prepare(self, batches: list[dict[str, torch.Tensor]], step: int, student: Any, rank: int = 0
                ) -> tuple[list[dict[str, torch.Tensor]], Source]:
        """The step's micro-batches, with generated completions when its source is a model; and the source."""
        if self._started_at is None:  # a resumed run: count the schedule's earlier steps
            self._started_at = step
            self.steps, self.on_policy = step, on_policy_steps(step, self.lmbda)
        source = self.source(step)
        self.steps += 1
        self.on_policy += source == "student"
        if source == "data":
            return batches, source
        model = student if source == "student" else self.teacher.live_model
        started = time.perf_counter()
        prompts = [self._prompts(batch) for batch in batches]
        flat = [p for group in prompts for p in group]
        completions = sample_completions(
            model, flat, self.sampling, stop_ids=stop_token_ids(model, self.tokenizer), pad_id=self.pad_id,
            # Seeded by (seed, step, rank): reproducible, resumable, and each rank samples differently.
            seed=(self.seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63),
        )
        rebuilt, offset = [], 0
        for batch, group in zip(batches, prompts, strict=True):
            rows = rebuild_batch(group, completions[offset:offset + len(group)], self.pad_id, batch["input_ids"])
            # Per-row keys (a mixture's `source`, `source_name`) describe the same rows: keep them.
            rebuilt.append({**{k: v for k, v in batch.items() if k not in rows}, **rows})
            offset += len(group)
        self.window["sequences"] += len(completions)
        self.window["generated"] += sum(len(c) for c in completions)
        self.window["seconds"] += time.perf_counter() - started
        return rebuilt, source

    @staticmethod
    def _prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
        attention = batch.get("attention_mask")
        prompts = []
        for row in range(batch["input_ids"].shape[0]):
            length = prompt_length(batch["labels"][row], attention[row] if attention is not None else None)
            prompts.append(batch["input_ids"][row, :length].tolist())
        return prompts

    def figures(self, window_seconds: float) -> dict[str, float]:
        """Logged with each loss: on-policy share so far, mean generated length and generation time in the window."""
        window, self.window = self.window, self._new_window()
        return {
            "on_policy_share": round(self.on_policy / max(self.steps, 1), 4),
            "generated_length": round(window["generated"] / window["sequences"], 2) if window["sequences"] else 0.0,
            "generation_seconds": round(window["seconds"], 3),
            "training_seconds": round(max(window_seconds - window["seconds"], 0.0), 3),
        }
