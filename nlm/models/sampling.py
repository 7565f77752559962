"""Batched sampling of completions as token ids: on-policy and sequence-level distillation, `teacher-generate`.

Generation itself is transformers' `generate` (KV cache, sampling warpers, stop tokens). What is ours: the
model runs in eval mode under no_grad and is put back as it was; the sampling RNG is forked so a seed fixes
the samples without moving the training RNG; completions are cut after their first stop token (kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_return_sequences: int = 1


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's own stop tokens (its generation config may list several), else the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """`ids` up to and including the first stop token (everything a model writes after it is padding)."""
    stops = set(stop_ids)
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    return ids


@torch.no_grad()
def sample_completions(
    model: Any, prompts: list[list[int]], settings: SamplingSettings, *, stop_ids: list[int], pad_id: int,
    seed: int | None = None,
) -> list[list[int]]:
    """Completion ids for each prompt, `num_return_sequences` per prompt in prompt order, each ending at its
    first stop token (kept) or at `max_new_tokens`. One `generate` call for all prompts, left-padded so every
    row's last position is its last prompt token. A PEFT model generates with its adapters active (no merge)."""
    device = next(model.parameters()).device
    # Each prompt repeated k times (greedy decoding refuses num_return_sequences > 1; the rows are the same).
    prompts = [prompt for prompt in prompts for _ in range(settings.num_return_sequences)]
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[row, longest - len(prompt):] = 1
    sampling = settings.temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": sampling, "use_cache": True,
                              "pad_token_id": pad_id}
    if stop_ids:
        kwargs["eos_token_id"] = stop_ids
    if sampling:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    was_training = model.training
    model.eval()  # dropout off while sampling
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    finally:
        model.train(was_training)
    new_tokens = output[:, longest:].tolist()  # [b·k, ≤max_new_tokens]
    return [cut_at_stop(row, stop_ids) for row in new_tokens]
