"""Which decoder layers matter: block influence on sample data (ShortGPT, Minitron's depth pruning).

    BI_l = 1 - mean over tokens of cos(x_l, y_l)     x_l: the input of decoder layer l, y_l: its output

A layer that barely turns its input (BI near 0) changes little of what flows through the residual stream and
is the first to drop; `init-student --by importance` keeps the `num_layers` layers of highest influence.
Measured in one pass of the teacher over a sample of the data (all tokens, padding excluded), each layer in
the full model, as ShortGPT does (not re-measured after each removal).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from nlm.errors import ConfigError


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList as long as `num_hidden_layers`."""
    depth = layer_count(model.config)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise ConfigError(f"{type(model).__name__}: found no list of {depth} decoder layers to prune")


def layer_count(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ConfigError(f"{type(config).__name__} does not say how many layers the model has")


def block_influence(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """BI of each decoder layer of `model` over the (unpadded) tokens of `batches`."""
    blocks = decoder_layers(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    current: dict[str, torch.Tensor] = {}

    def hook(index: int) -> Any:
        def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            mask = current["mask"]
            cos = torch.nn.functional.cosine_similarity(inputs[mask].float(), outputs[mask].float(), dim=-1, eps=1e-6)
            sums[index] += (1 - cos).double().sum().cpu()
        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                count += int(current["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ConfigError("--data: no tokens to measure layer importance on")
    return (sums / count).tolist()


def sample_batches(data: Path, tokenizer: Any, samples: int, max_seq_length: int, batch_size: int = 8) -> list[dict]:
    """The first `samples` examples of a JSONL file (any record format), whole sequences, padded per batch."""
    from nlm.data.tokenize import TokenizeSettings, tokenize_records

    with tempfile.TemporaryDirectory(prefix="nlm-importance-") as scratch:
        tokenized = tokenize_records([Path(data)], tokenizer, TokenizeSettings(max_seq_length=max_seq_length),
                                     cache_root=Path(scratch))
        rows = [list(ids) for ids in tokenized.dataset.select(range(min(samples, len(tokenized.dataset))))["input_ids"]]
    if not rows:
        raise ConfigError(f"--data {data}: no records to measure layer importance on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in chunk])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in chunk])
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def important_layers(influence: list[float], count: int) -> list[int]:
    """The `count` layers of highest influence, in model order."""
    if not 1 <= count <= len(influence):
        raise ConfigError(f"--num_layers {count}: the teacher has {len(influence)} layers")
    ranked = sorted(range(len(influence)), key=lambda layer: -influence[layer])
    return sorted(ranked[:count])


def even_layers(depth: int, count: int) -> list[int]:
    """`count` layers spread evenly from layer 0: floor(i·depth/count) (every depth/count-th layer)."""
    if not 1 <= count <= depth:
        raise ConfigError(f"--num_layers {count}: the teacher has {depth} layers")
    return [i * depth // count for i in range(count)]
