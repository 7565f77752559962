"""Weight quantization with torchao through transformers' `TorchAoConfig`.

Which torchao configs run where (checked with torch 2.13 CPU and torchao 0.18; see docs/BENCHMARKS.md):
- int8: linears get `Int8WeightOnlyConfig` (per row); the input embedding and the output head get
  `IntxWeightOnlyConfig(int8, per row)`, whose tensor serves both a lookup and a matmul. All of it saves to
  safetensors; the `quantization_config` in config.json makes a plain `from_pretrained` (so `nlm
  eval/generate/serve`) rebuild it with no extra flag.
- int4: `IntxWeightOnlyConfig(int4, per-group, symmetric)` on every device: int4 values and group scales.
  torchao 0.18 keeps them one value per byte (it has no packed int4 tensor that both runs on CPU and saves
  to safetensors; `Int4WeightOnlyConfig`'s tinygemm layout needs CUDA), so the export stores them through
  compressed-tensors' `pack-quantized` layout, two per byte (`nlm.export.packed`), a W4A16 folder that
  transformers loads (vLLM 0.32 refused the default one: docs/DEPLOY.md). The embedding and head get int8
  per row under int4 as well (`table_config`: int4 there cost SmolLM2-135M +9.7% held-out loss against +1.5%).
- A quantization-aware run (`quantization_aware:` in the training config, `nlm.training.quantization_aware`)
  trains against `weight_config(scheme, group_size)`; its export uses exactly that config for every linear,
  the embedding and the head, so the exported model is the one that was trained (`nlm.models.quantization`).
- A tied head and embedding stay tied: one quantized tensor (Intx, per row or per group along the hidden
  width) is both the lookup table and the head, stored once (`drop_tied_head`). Untying would store the
  vocabulary matrix twice (for SmolLM2-135M +28M bytes at int8, +0.05x of the fp32 size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nlm.errors import ConfigError
from nlm.models.quantization import (
    embedding_names,
    group_size_for,
    table_config,
    torchao_quantization,
    weight_config,
)

__all__ = ["drop_tied_head", "embedding_names", "group_size_for", "torchao_config", "weight_config"]


def _linear_config(fmt: str, group_size: int) -> Any:
    """What a post-training export uses for the transformer's linears (the head and embedding aside)."""
    ao = torchao_quantization()
    if fmt == "int8":
        return ao.Int8WeightOnlyConfig()
    return weight_config(fmt, group_size)  # int4: the values nlm.export.packed stores two per byte


def torchao_config(
    fmt: str,
    model: Any,
    *,
    group_size: int | None = None,
    keep_head_fp: bool = False,
    trained_scheme: bool = False,
) -> Any:
    """The `TorchAoConfig` for `fmt` ('int8' or 'int4') for `model`, the same on CPU and CUDA.

    The head and the input embedding are quantized too unless `keep_head_fp`; `trained_scheme` (a
    quantization-aware run) uses `weight_config` for every module.
    """
    torchao_quantization()
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    if fmt not in ("int8", "int4"):
        raise ConfigError(f"unknown quantized format {fmt!r}: expected int8 or int4")
    size = group_size or group_size_for(model.config, 128)
    linears = weight_config(fmt, size) if trained_scheme else _linear_config(fmt, size)
    if keep_head_fp:
        return TorchAoConfig(linears)
    table = table_config(fmt, size)
    names = embedding_names(model)
    configs = {"_default": linears, names["input"]: table}
    if not names["tied"] and names["output"]:
        configs[names["output"]] = table
    return TorchAoConfig(FqnToConfig(configs), include_input_output_embeddings=True)


def drop_tied_head(folder: Path, head: str) -> None:
    """Remove the head's copy of a tied, quantized embedding from the saved safetensors.

    transformers' tied-weight dedup matches `lm_head.weight`, not the flattened torchao keys
    (`lm_head._weight_qdata`, ...), so the tied matrix would be written twice and reloading would fail
    comparing the two copies (torchao tensors have no `equal`). Without the head's keys, loading ties the
    head to the quantized embedding as for any tied checkpoint.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    prefix = f"{head}."
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(file))
        if not any(key.startswith(prefix) for key in tensors):
            continue
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        metadata = {k: v for k, v in metadata.items() if not k.startswith(prefix)}
        if "tensor_names" in metadata:
            metadata["tensor_names"] = json.dumps([n for n in json.loads(metadata["tensor_names"])
                                                   if not n.startswith(prefix)])
        save_file(tensors, str(file), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if not k.startswith(prefix)}
        index.write_text(json.dumps(data, indent=2) + "\n")
