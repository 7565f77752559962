"""Weight quantization with torchao through transformers' `TorchAoConfig`.

Which torchao configs run where (checked with torch 2.13 CPU and torchao 0.18; see docs/BENCHMARKS.md):
- int8: `Int8WeightOnlyConfig` runs on CPU and CUDA and saves to safetensors; the `quantization_config` in
  config.json makes a plain `from_pretrained` (so `nlm eval/generate/serve`) rebuild it with no extra flag.
- int4: `Int4WeightOnlyConfig` (packed int4, tinygemm kernels) needs CUDA; on CPU it fails at load time,
  so the CPU path uses `IntxWeightOnlyConfig(int4, per-group)`: int4 values and group scales, stored one
  value per byte (same size as int8 on disk; the accuracy of int4). Both reload with no extra flag.
"""

from __future__ import annotations

from typing import Any

import torch

from nlm.errors import ConfigError


def _group_size(model_config: Any, preferred: int) -> int:
    """The largest of preferred, 64, 32 that divides every linear input width (hidden and MLP sizes)."""
    widths = [getattr(model_config, name, None) for name in ("hidden_size", "intermediate_size")]
    widths = [w for w in widths if w]
    for size in (preferred, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise ConfigError(f"int4 export: hidden/intermediate sizes {widths} are not multiples of 32")


def torchao_config(fmt: str, model_config: Any, device: str) -> Any:
    """The `TorchAoConfig` for `fmt` ('int8' or 'int4') on `device` ('cpu' or 'cuda')."""
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
        )
        from transformers import TorchAoConfig
    except ImportError:
        raise ConfigError("--format int8/int4 needs torchao: run `pip install 'torchao>=0.18,<0.19'` "
                          "(or: pip install -e '.[export]' in the nlm checkout)") from None
    if fmt == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if fmt == "int4":
        if device == "cuda":
            return TorchAoConfig(Int4WeightOnlyConfig(group_size=_group_size(model_config, 128)))
        return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                  granularity=PerGroup(_group_size(model_config, 128))))
    raise ConfigError(f"unknown quantized format {fmt!r}: expected int8 or int4")
