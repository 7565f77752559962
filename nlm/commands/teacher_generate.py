"""Write the teacher's completions for a file of prompts (offline sequence-level KD, data synthesis).

Reads PROMPTS.jsonl ({"prompt": ...}, prompt/completion, text or chat "messages" records; bad lines are
skipped and reported like `nlm train` reports them) and writes OUT.jsonl with --num_return_sequences records
per valid prompt: prompt/completion records, or "messages" records ending in the teacher's assistant turn
for chat input. Generation is batched, shows progress and is resumable: rerun the same command after an
interruption and it continues where it stopped. The output trains with `nlm train --train_file OUT.jsonl`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    """The command's flags."""

    model_config = ConfigDict(extra="forbid")

    teacher_model: str = Field(description="teacher: a Hugging Face hub id or a local folder")
    data: str = Field(description="JSONL file of prompts", json_schema_extra={"file": True})
    output: str = Field(description="JSONL file to write (resumed when it was written by an earlier, stopped run)")
    max_new_tokens: int = Field(256, ge=1, le=65_536, description="longest completion, in tokens")
    temperature: float = Field(1.0, ge=0, le=100, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1: off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0: off)")
    num_return_sequences: int = Field(1, ge=1, le=1024, description="completions (records) per prompt")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    seed: int = Field(0, ge=0, description="sampling seed (the same seed gives the same file)")
    prompt_separator: str = Field("\n", description="text between prompt and completion, as in nlm train")
    device: str | None = Field(None, description="cuda, mps or cpu (default: the first available)")
    teacher_revision: str | None = Field(None, description="hub revision of the teacher")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")
    overwrite: bool = Field(False, description="replace an existing output file (one nlm wrote) instead of resuming it")

    _output_is_safe = field_validator("output")(staticmethod(output_path_check))


def run(options: Options) -> int:
    """Generate through `nlm.apps.teacher_generate.generate_teacher_data`; print where the records went."""
    import os
    from pathlib import Path

    from nlm.apps.teacher_generate import TeacherGenerateSettings, generate_teacher_data

    settings = TeacherGenerateSettings(
        max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
        top_k=options.top_k, num_return_sequences=options.num_return_sequences, batch_size=options.batch_size,
        seed=options.seed, prompt_separator=options.prompt_separator,
    )
    report = generate_teacher_data(
        options.teacher_model, Path(options.data), Path(options.output), settings, device=options.device,
        overwrite=options.overwrite, revision=options.teacher_revision, token=os.environ.get("NLM_HF_TOKEN") or None,
        trust_remote_code=options.trust_remote_code,
    )
    skipped = sum(report.read.get("skipped", {}).values())
    resumed = f", resumed after {report.resumed_at}" if report.resumed_at else ""
    print(f"teacher-generate: {report.records} records for {report.prompts} prompts in {report.output}"
          f" ({skipped} input lines skipped{resumed})")
    return 0
