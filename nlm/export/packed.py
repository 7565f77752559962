"""int4 exports in compressed-tensors' `pack-quantized` layout: eight int4 values per int32, two per byte.

torchao 0.18 on CPU keeps int4 one value per byte (`IntxUnpackedToInt8Tensor`), so its own safetensors
are no smaller than int8. The int4 values and group scales are still torchao's (the ones QAD's fake
quantizers saw, `nlm.models.quantization.weight_config`); compressed-tensors only stores them:

- every linear but the head: W4A16, symmetric int4 per group of `group_size` input columns, format
  `pack-quantized` (`weight_packed` int32, `weight_scale`, `weight_shape`), compressed-tensors' W4A16 scheme;
- the input embedding and the output head (unless --keep_head_fp): int8 per row, format `int-quantized`
  (`weight` int8, `weight_scale`), the int8 choice of `table_config`.

config.json gets compressed-tensors' `quantization_config`, so a plain `from_pretrained` (nlm eval,
generate, serve) rebuilds the model: transformers' CompressedTensorsHfQuantizer decompresses it to fp32
(q * scale, torchao's own dequantization) before the first forward. vLLM 0.32 (CPU) refused the default
folder (the int8 head and embedding make it `mixed-precision`) and did not get a `--keep_head_fp` folder
started: serving an int4 export through vLLM is not shown (docs/DEPLOY.md, docs/BENCHMARKS.md).

A tied head and embedding are stored once: the head's int8 copy is left out of the file and only its
per-row scale (vocabulary x 1) is kept. Loading ties the head to the compressed embedding, and
compressed-tensors decompresses each of the two modules with its own scale, so in memory they become two
equal fp32 matrices (untied after loading; the bytes on disk stay one copy).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from nlm.errors import ConfigError
from nlm.models.quantization import required_module

COMPRESSED_TENSORS_MISSING = ("needs compressed-tensors: run `pip install 'compressed-tensors>=0.20,<0.21'` "
                              "(or: pip install -e '.[export]' in the nlm checkout)")


def compressed_tensors_quantization(what: str = "--format int4") -> Any:
    """`compressed_tensors.quantization`, or a ConfigError naming `what` needs it and the install line."""
    return required_module("compressed_tensors.quantization", what, COMPRESSED_TENSORS_MISSING)


def pack_quantized_config(group_size: int, tables: list[str], ignore: list[str]) -> Any:
    """compressed-tensors' QuantizationConfig: int4 packed linears, int8 rows for the `tables` module names,
    `ignore`d modules (a head kept in fp32) left dense.

    Exact module names win over the class target "Linear" in compressed-tensors' matching, so a head named
    in `tables` is int8, not int4.
    """
    ct = compressed_tensors_quantization()
    groups = {}  # the tables first: compressed-tensors' matcher warns about a name a class target matched first
    if tables:
        groups["tables"] = ct.QuantizationScheme(
            targets=tables, format="int-quantized",
            weights=ct.QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"))
    groups["linears"] = ct.QuantizationScheme(
        targets=["Linear"], format="pack-quantized",
        weights=ct.QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
    return ct.QuantizationConfig(config_groups=groups, ignore=ignore,
                                 format="mixed-precision" if tables else "pack-quantized")


def write_pack_quantized(plain: Any, quantized: Any, output: Path, group_size: int, names: dict[str, Any],
                         keep_head_fp: bool) -> dict[str, Any]:
    """Save `quantized` (torchao Intx weights over `plain`'s modules) to `output` in pack-quantized layout.

    A copy of the fp32 `plain` model gets compressed-tensors' quantization parameters set to torchao's
    scales and its weights to torchao's dequantized values; compressed-tensors' compressor then rounds
    them back to exactly torchao's integers (w / scale = q up to float rounding) and packs them.
    """
    from compressed_tensors.compressors import ModelCompressor

    ct = compressed_tensors_quantization()
    tables = [] if keep_head_fp else [names["input"]] + ([names["output"]] if names["output"] else [])
    head = [names["output"]] if names["output"] else []
    config = pack_quantized_config(group_size, tables, ignore=head if keep_head_fp else [])
    target = copy.deepcopy(plain)
    ct.apply_quantization_config(target, config, show_progress=False)
    sources = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in target.named_modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            weight = sources[name].weight  # IntxUnpackedToInt8Tensor: qdata [out, in], scale [out, in/group]
            if weight.zero_point.abs().max() != 0:
                raise ConfigError(f"{name}: torchao gave an asymmetric weight; pack-quantized expects symmetric")
            module.weight_scale.copy_(weight.scale)
            module.weight.copy_(weight.dequantize())
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(target)
    state = target.state_dict()
    if names["tied"] and tables:
        state.pop(f"{names['output']}.weight")  # the embedding's int8 matrix again: stored once
    target.save_pretrained(output, state_dict=state)
    compressor.update_config(str(output))
    return {"library": "compressed-tensors", "format": config.format, "quantized_with": "torchao",
            "config": "IntxWeightOnlyConfig", "linears": f"int4, symmetric, group {group_size}, pack-quantized",
            "head_and_embedding": "fp32" if keep_head_fp else ("quantized, tied (stored once)" if names["tied"]
                                                               else "quantized")}
