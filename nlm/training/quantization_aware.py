"""Quantization-aware distillation (QAD): the student trains through torchao's QAT fake quantizers.

`quantization_aware: {scheme: int4, group_size: 32}` in the training config. Before training,
`prepare_student` swaps the student's nn.Linear layers (and, unless `keep_head_fp`, its input embedding and
output head) for torchao's `FakeQuantizedLinear` / `FakeQuantizedEmbedding`, whose fake quantizers come from
the same `IntxWeightOnlyConfig`s that `nlm export --format <scheme>` applies (`nlm.models.quantization`:
the scheme for the linears, int8 per row for the embedding and head).
The forward sees the quantized weights, the backward passes straight through to the fp32 weights, and the
usual objective (any teacher: often the student's own full-precision folder) pulls the quantized model back
towards the teacher's distribution. A tied head and embedding keep one weight: both fake-quantize it alike,
as the export stores it once.

`strip_fake_quantizers` swaps the modules back (same weights) before final/ is written, so final/ is a plain
fp32 folder with the scheme in training_metadata.json; `nlm export` quantizes it with that scheme.

Supported: full fine-tuning, with the fused or simple loss, with any teacher kind. Refused (config error,
exit 2): LoRA (the adapter would be merged and quantized after training: not the model trained).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nlm.config.settings import QuantizationAwareConfig
from nlm.errors import ConfigError
from nlm.models.quantization import embedding_names, table_config, weight_config

logger = logging.getLogger(__name__)

WHAT = "quantization_aware"


def prepare_student(student: Any, settings: QuantizationAwareConfig) -> Any:
    """The student with fake-quantized linears (and head + embedding unless keep_head_fp); as is for 'none'."""
    if not settings.enabled:
        return student
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    _check_group_size(student, settings)
    names = embedding_names(student)
    tables = {names["input"], names["output"]}
    quantize_(student, QATConfig(weight_config(settings.scheme, settings.group_size, WHAT), step="prepare"),
              filter_fn=lambda module, fqn: fqn not in tables and isinstance(module, torch.nn.Linear))
    if not settings.keep_head_fp:  # the vocabulary matrices as the export stores them (int8 per row)
        quantize_(student, QATConfig(table_config(settings.scheme, settings.group_size, WHAT), step="prepare"),
                  filter_fn=lambda module, fqn: fqn in tables)
    if names["tied"] and not settings.keep_head_fp:
        head, table = student.get_output_embeddings(), student.get_input_embeddings()
        if head.weight is not table.weight:  # torchao keeps the Parameter; checked so a tie is never lost
            raise RuntimeError("fake quantization untied the head and the embedding")
    swapped = sum(1 for m in student.modules() if _is_fake_quantized(m))
    logger.info("quantization-aware: %d modules fake-quantized as %s%s", swapped, settings.scheme,
                f" (group {settings.group_size})" if settings.scheme == "int4" else " (per row)")
    return student


def strip_fake_quantizers(model: Any) -> Any:
    """Swap torchao's fake-quantized modules back for nn.Linear / nn.Embedding holding the same weights."""
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantizedLinear):
                setattr(parent, name, child.to_linear())
            elif isinstance(child, FakeQuantizedEmbedding):
                setattr(parent, name, child.to_embedding())
    return model


def _is_fake_quantized(module: Any) -> bool:
    return type(module).__name__ in ("FakeQuantizedLinear", "FakeQuantizedEmbedding")


def _check_group_size(student: Any, settings: QuantizationAwareConfig) -> None:
    if settings.scheme != "int4":
        return
    widths = sorted({m.in_features for m in student.modules() if isinstance(m, torch.nn.Linear)}
                    | {m.embedding_dim for m in student.modules() if isinstance(m, torch.nn.Embedding)})
    bad = [w for w in widths if w % settings.group_size]
    if bad:
        raise ConfigError(f"quantization_aware.group_size {settings.group_size}: the student's input widths "
                          f"{bad} are not multiples of it (expected a divisor of {widths})")
