"""Speculative decoding with a draft model, through transformers' assisted generation, and its acceptance counts.

The draft proposes `num_assistant_tokens` tokens, the target checks them all in one forward pass and keeps the
longest agreeing prefix plus one token of its own. Greedy output is the target's own greedy output. The algorithm
is transformers' (`generate(assistant_model=...)`); this module only configures it and counts what it did:
a forward pre-hook on the target sees every verify step, and the `logits_to_keep` the library passes to that
forward is `candidates + 1`, so the number of drafted tokens is read from the library, not re-derived.

    tokens per target forward = new tokens / target forwards (1.0 without a draft; K + 1 at most)
    accepted draft tokens     = new tokens - target forwards (each verify step adds one token of the target's)
    acceptance rate           = accepted draft tokens / drafted tokens
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nlm.errors import VocabularyMismatchError
from nlm.models.vocab import tokenizers_equal


@dataclass
class DraftCounts:
    """What speculative decoding did over some generations (sums, so they add up across requests)."""

    new_tokens: int = 0
    target_forwards: int = 0  # verify steps (the prefill counts: it verifies the first candidates too)
    drafted: int = 0  # candidate tokens the draft proposed

    def add(self, other: DraftCounts) -> None:
        self.new_tokens += other.new_tokens
        self.target_forwards += other.target_forwards
        self.drafted += other.drafted

    @property
    def accepted(self) -> int:
        return max(self.new_tokens - self.target_forwards, 0)

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def accepted_per_target_forward(self) -> float:
        return self.accepted / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_draft_tokenizer(draft_tokenizer: Any, target_tokenizer: Any, draft: str, target: str) -> None:
    """Draft and target must share one tokenizer: the target verifies the draft's token ids as its own."""
    if not tokenizers_equal(target_tokenizer, draft_tokenizer):
        raise VocabularyMismatchError(
            f"draft {draft} and target {target} have different tokenizers; a draft must share its target's "
            "tokenizer (distil it from that target, or prune it with `nlm init-student`)")


def configure_draft(draft: Any, num_assistant_tokens: int) -> None:
    """A fixed number of candidates per verify step: transformers' defaults adapt it (the `heuristic` schedule
    and a confidence threshold that stops drafting early), and keep that state on the draft between calls,
    which would make one measurement depend on the ones before it."""
    config = draft.generation_config
    config.num_assistant_tokens = num_assistant_tokens
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0


@contextmanager
def count_verify_steps(target: Any) -> Iterator[DraftCounts]:
    """Counts the target's forward passes and the candidates each one verified, while the block runs."""
    counts = DraftCounts()

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        counts.target_forwards += 1
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, int) and keep > 0:
            counts.drafted += keep - 1
        else:  # a model without logits_to_keep: the fed tokens past the first are candidates (not on prefill)
            ids = kwargs.get("input_ids")
            counts.drafted += max(int(ids.shape[-1]) - 1, 0) if ids is not None and counts.target_forwards > 1 else 0

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


@torch.no_grad()
def assisted_greedy(target: Any, draft: Any | None, input_ids: torch.Tensor, max_new_tokens: int, *,
                    pad_token_id: int, eos_token_id: Any, cache: Any = None) -> tuple[list[int], DraftCounts]:
    """Greedy new tokens for one row `input_ids` [1, L], with `draft` as the target's assistant (None: the target
    alone), and what the draft did. `cache` (a DynamicCache holding the first L-1 positions) is used and left
    holding every position but the last new token, as after a plain decode step."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_token_id,
                              "eos_token_id": eos_token_id, "attention_mask": torch.ones_like(input_ids),
                              "return_dict_in_generate": False}
    if draft is not None:
        kwargs["assistant_model"] = draft
    if cache is not None:
        kwargs["cache"] = cache
    with count_verify_steps(target) as counts:
        output = target.generate(input_ids, **kwargs)
    tokens = output[0, input_ids.shape[1]:].tolist()
    counts.new_tokens = len(tokens)
    return tokens, counts
