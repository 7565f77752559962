"""Make a student from a teacher by keeping some of its layers (a pruned start for layer-wise distillation).

Writes a plain transformers model folder (config, safetensors weights, tokenizer) with the teacher's
embeddings, head, final norm and the chosen decoder layers: `--layers 0,5,10,15` keeps those (0-based),
`--keep_every N` keeps layers 0, N, 2N, ... and the last one; `--num_layers N` keeps N layers chosen
`--by even` (every depth/N-th from 0) or `--by importance` (the N of highest block influence, 1 - cos of
each layer's input and output, measured on `--data FILE`; ShortGPT / Minitron depth pruning). The kept
layers are recorded in the student's config.json (`nlm_kept_layers`) for `hidden_states.layers: auto`. Train it with `--student_model DIR`, ideally
with `distillation.hidden_states` so the kept layers learn to stand in for the dropped ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    """The command's flags."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(description="teacher: a Hugging Face hub id or a local folder")
    output: str = Field(description="folder to write the student to")
    layers: str | None = Field(None, description="comma-separated teacher layers to keep, 0-based (e.g. 0,5,10)")
    keep_every: int | None = Field(None, ge=1, description="keep every N-th layer (and the last); instead of --layers")
    num_layers: int | None = Field(None, ge=1, description="keep this many layers, chosen --by; instead of --layers")
    by: Literal["even", "importance"] = Field("even", description="with --num_layers: even spacing, or the layers of "
                                              "highest block influence on --data")
    data: str | None = Field(None, description="JSONL sample to measure layer importance on (--by importance)",
                             json_schema_extra={"file": True})
    samples: int = Field(64, ge=1, description="records of --data to measure on")
    overwrite: bool = Field(False, description="replace a student an earlier init-student wrote at --output (only its files)")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")

    _output_is_safe = field_validator("output")(staticmethod(output_path_check))

    @field_validator("layers")
    @classmethod
    def _layer_list(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                [int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"expected comma-separated layer numbers such as 0,5,10, found {value!r}") from None
        return value


def run(options: Options) -> int:
    """Prune through `nlm.models.prune.init_student`; print what was kept."""
    from pathlib import Path

    from nlm.models.prune import init_student

    layers = [int(part) for part in options.layers.split(",") if part.strip()] if options.layers is not None else None
    report = init_student(options.teacher, Path(options.output), layers=layers, keep_every=options.keep_every,
                          overwrite=options.overwrite, trust_remote_code=options.trust_remote_code,
                          num_layers=options.num_layers, by=options.by,
                          data=Path(options.data) if options.data else None, samples=options.samples)
    print(f"init-student: {report['output']} keeps teacher layers {','.join(map(str, report['layers']))} "
          f"of {report['teacher_layers']} ({report['parameters']} parameters)")
    if "influence" in report:
        print("block influence per teacher layer: " + " ".join(f"{value:.3f}" for value in report["influence"]))
    return 0
