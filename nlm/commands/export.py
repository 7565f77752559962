"""Export a trained student: merged, int8, int4 or gguf.

merged: a LoRA run's adapter merged into a plain model folder. int8/int4: torchao weight quantization,
saved so `nlm eval`, `nlm generate` and `nlm serve` load it with no extra flag; the output head and the
input embedding are quantized too (a tied pair stays tied, stored once) unless --keep_head_fp. A run trained
with `quantization_aware:` is exported with its own scheme and group size. gguf: one .gguf file for
llama.cpp/Ollama (Llama-family models; --quant f16, q8_0 or q4_0). Every export writes
export_metadata.json (source run, format, sizes, and with --eval_file the held-out loss delta).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    """The flags of `nlm export`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="trained run folder or its final/ folder")
    output: str = Field(description="folder to write (new or empty, or an earlier export with --overwrite)")
    format: Literal["merged", "int8", "int4", "gguf"] = Field("merged", description="what to write")
    quant: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="GGUF tensor type (--format gguf only)")
    eval_file: str | None = Field(None, description="held-out JSONL: report the loss/perplexity delta vs the source")
    overwrite: bool = Field(False, description="replace an earlier export in --output (only files nlm wrote)")
    trust_remote_code: bool = Field(False, description="run model code shipped with the model")
    keep_head_fp: bool = Field(False, description="int8/int4: keep the output head and input embedding in fp32 "
                               "(by default they are quantized too)")
    group_size: int | None = Field(None, ge=32, description="int4: columns per quantization group (default: "
                                   "128, or the largest of 64/32 dividing the widths; a quantization-aware "
                                   "run's own group size is used)")

    _output_is_safe = field_validator("output")(staticmethod(output_path_check))


def run(options: Options) -> int:
    """Export through `nlm.apps.export.export_model` and print where it went and what it measured."""
    import json

    from nlm.apps.export import export_model

    result = export_model(options.model, options.output, options.format, quant=options.quant,
                          eval_file=options.eval_file, overwrite=options.overwrite,
                          trust_remote_code=options.trust_remote_code, group_size=options.group_size,
                          keep_head_fp=options.keep_head_fp)
    summary = {"output": str(result.output_dir), "format": options.format, **result.metadata["sizes"]}
    if "quality" in result.metadata:
        quality = result.metadata["quality"]
        summary.update(loss_source=quality["source"]["loss"], loss_export=quality["export"]["loss"],
                       loss_delta_pct=quality["loss_delta_pct"])
    print(json.dumps(summary))
    return 0
