"""Plain generation with a trained model: `nlm generate` and the server's building block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        sampling = self.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sampling,
            "num_return_sequences": self.num_return_sequences,
            "repetition_penalty": self.repetition_penalty,
        }
        if sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: list[str], settings: GenerationSettings,
                   add_special_tokens: bool = True) -> list[list[str]]:
    """Completions for each prompt (num_return_sequences each), decoded without the prompt.

    Prompts are left-padded so every row's last position is its last real token (decoder-only models).
    `add_special_tokens=False` for text a chat template already rendered (it holds its own BOS).
    """
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
    output = model.generate(
        **batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings.generate_kwargs()
    )
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    n = settings.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end-of-sequence id: the generation config's (often several, e.g. <|eot_id|> too), the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if isinstance(v, int))
    ids.discard(-1)
    return ids
