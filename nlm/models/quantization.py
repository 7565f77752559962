"""The weight quantization schemes nlm trains against and exports: one torchao config per scheme.

Both quantization-aware training (`nlm.training.quantization_aware`: torchao's QAT derives its fake
quantizers from this config) and `nlm export --format int8|int4` (which applies it for real) use
`weight_config`, so the exported weights are the ones the fake quantizers showed the loss.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from nlm.errors import ConfigError

TORCHAO_MISSING = ("needs torchao: run `pip install 'torchao>=0.18,<0.19'` "
                   "(or: pip install -e '.[export]' in the nlm checkout)")


def required_module(name: str, what: str, missing: str) -> Any:
    """The module `name`, or a ConfigError "{what} {missing}" (`missing`: "needs PACKAGE: run `pip install ...`").

    Shared by the optional quantization libraries: torchao here, compressed-tensors in `nlm.export.packed`.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"{what} {missing}") from None


def torchao_quantization(what: str = "--format int8/int4") -> Any:
    """`torchao.quantization`, or a ConfigError naming `what` needs it and the install line."""
    return required_module("torchao.quantization", what, TORCHAO_MISSING)


def weight_config(scheme: str, group_size: int, what: str = "--format int8/int4") -> Any:
    """torchao's weight-only config of a scheme: int8 per row (group_size unused), int4 per group of columns.

    `IntxWeightOnlyConfig` runs on CPU and CUDA, serves both nn.Linear and nn.Embedding (so a tied head and
    embedding can share one quantized tensor), saves to safetensors and is a base config torchao's QAT maps
    to matching fake quantizers.
    """
    ao = torchao_quantization(what)
    if scheme == "int8":
        return ao.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=ao.PerAxis(0))
    if scheme == "int4":
        return ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(group_size))
    raise ConfigError(f"unknown quantized format {scheme!r}: expected int8 or int4")


def table_config(scheme: str, group_size: int, what: str = "--format int8/int4") -> Any:
    """The config of the vocabulary matrices (input embedding, output head) under a scheme: int8 per row.

    For int4 too: int4 on the vocabulary matrix cost SmolLM2-135M +9.7% held-out loss against +1.5% with it
    in fp32 (docs/BENCHMARKS.md), while int8 costs nothing measurable; and on CPU torchao stores int4 one
    value per byte, so int8 there costs no bytes either.
    """
    return weight_config("int8", group_size, what)


def group_size_for(model_config: Any, preferred: int, what: str = "int4 export") -> int:
    """The largest of preferred, 64, 32 that divides every linear input width (hidden and MLP sizes)."""
    widths = [getattr(model_config, name, None) for name in ("hidden_size", "intermediate_size")]
    widths = [w for w in widths if w]
    for size in (preferred, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise ConfigError(f"{what}: hidden/intermediate sizes {widths} are not multiples of 32")


def embedding_names(model: Any) -> dict[str, Any]:
    """Module names of the input embedding and the output head, and whether they share one weight."""
    modules = {id(m): name for name, m in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and outputs.weight is inputs.weight
    return {"input": modules[id(inputs)], "output": modules.get(id(outputs)) if outputs is not None else None,
            "tied": tied}
