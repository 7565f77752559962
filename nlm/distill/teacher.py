"""Teachers supply the target distribution for a batch. The live teacher runs a frozen model."""

from __future__ import annotations

from typing import Any

import torch

from nlm.models.loading import freeze


class LiveTeacher:
    """A frozen causal LM on its own device and dtype; returns logits on that device, without autograd."""

    def __init__(self, model: Any, device: torch.device | str, vocab_width: int) -> None:
        self.model = freeze(model).to(device)
        self.device = torch.device(device)
        self.vocab_width = vocab_width

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, vocab_width] logits (padding rows of the head dropped), on the teacher's device."""
        input_ids = input_ids.to(self.device, non_blocking=True)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device, non_blocking=True)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits[..., : self.vocab_width]
