"""Access to a causal LM's final hidden states and output head, for the fused loss.

`capture_hidden` swaps the output head's forward for one that records its input and returns a zero-width
tensor, so the model's forward runs its whole body but never computes full logits. The head's real
forward (adapters included) is handed back for chunk-wise use. Models that post-process logits (soft-capping,
scaling) would make that wrong; `head_reproduces_logits` detects them so the caller can fall back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def output_head(model: Any) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)")
    return head


@contextmanager
def capture_hidden(model: Any) -> Iterator[tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]:
    """Within the block, model(...) records the head's input in store["hidden"] and yields empty logits."""
    head = output_head(model)
    had_instance_forward = "forward" in vars(head)
    real_forward = head.forward
    store: dict[str, torch.Tensor] = {}

    def record(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        store["hidden"] = hidden
        # Zero-width "logits" that still depend on the hidden states and the head's trainable parameters:
        # DDP (find_unused_parameters) walks the forward's outputs to learn which parameters will get a
        # gradient; the fused loss delivers the head's gradient later, so the head must look used here.
        empty = hidden[..., :0]
        # Looked up at call time: FSDP2 swaps the sharded parameters for whole ones around the forward.
        # (A quantized head's torchao weight is frozen and has no reshape: skipped.)
        for param in (p for p in head.parameters() if p.requires_grad and type(p.data) is torch.Tensor):
            empty = empty + param.reshape(-1)[:1].sum() * 0
        return empty

    head.forward = record
    try:
        yield store, real_forward
    finally:
        if had_instance_forward:
            head.forward = real_forward
        else:
            del head.forward


@torch.no_grad()
def head_reproduces_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bool:
    """Whether head(final hidden states) equals the model's logits (no soft-capping or scaling after the head)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        with capture_hidden(model) as (store, head):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        rebuilt = head(store["hidden"])
    finally:
        model.train(was_training)
    return rebuilt.shape == logits.shape and torch.allclose(rebuilt.float(), logits.float(), rtol=1e-3, atol=1e-3)


def sliced_head(model_or_head: Any, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """[c, H] -> [c, width] logits of the real vocabulary rows only.

    A plain `nn.Linear` head multiplies by `weight[:width]` (and `bias[:width]`), so the padding rows of a
    padded head (e.g. 152,064 rows over a 151,936-token tokenizer) are never computed. Any other head
    (adapter-wrapped, custom) runs whole and is sliced: its rows cannot be selected from outside.
    """
    head = model_or_head if isinstance(model_or_head, torch.nn.Module) and not hasattr(model_or_head, "get_output_embeddings") \
        else output_head(model_or_head)
    if type(head) is torch.nn.Linear:
        weight, bias = head.weight, head.bias

        def rows(hidden: torch.Tensor) -> torch.Tensor:
            if width >= weight.shape[0]:  # nothing to drop (and a torchao-quantized weight need not slice)
                return torch.nn.functional.linear(hidden, weight, bias)
            return torch.nn.functional.linear(hidden, weight[:width], bias[:width] if bias is not None else None)

        return rows
    return lambda hidden: head(hidden)[..., :width]
