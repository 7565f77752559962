"""Active learning: keep the pool records a teacher and a student disagree on most.

Scores every record of --data in one batched pass of both models and writes the top --fraction (or exactly
--count) records verbatim to --output, best first; --scores writes every record's line, score and the
figures behind it. Criteria, over completion tokens: disagreement (1 - top-1 agreement of teacher and
student), teacher_student_kl (KL(teacher || student)), student_entropy, teacher_entropy. A record with a
prompt and no completion is scored on the STUDENT'S OWN GREEDY ANSWER, which the teacher then scores.
--diverse passes over near-duplicates (word 3-gram overlap above 0.5) while distinct records remain.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    """Flags of `nlm data select`."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(description="teacher model: hub id or folder")
    student: str = Field(description="student model (the one to improve): hub id or folder")
    data: str = Field(description="pool JSONL; prompt-only records are scored on the student's greedy answer")
    output: str = Field(description="JSONL file for the selected records (verbatim, most uncertain first)")
    by: Literal["disagreement", "teacher_student_kl", "student_entropy", "teacher_entropy"] = Field(
        "disagreement", description="uncertainty criterion")
    fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of the pool")
    count: int | None = Field(None, ge=1, description="keep exactly this many records")
    scores: str | None = Field(None, description="also write every record's scores here (JSONL)")
    diverse: bool = Field(False, description="pass over near-duplicates of records already selected")
    batch_size: int = Field(8, ge=1, description="records per scoring batch")
    max_seq_length: int = Field(512, ge=8, description="longer records are truncated for scoring")
    max_new_tokens: int = Field(64, ge=1, description="longest student answer for prompt-only records")
    device: Literal["cuda", "mps", "cpu"] | None = Field(None, description="device (default: the best available)")
    overwrite: bool = Field(False, description="replace output files an earlier nlm command wrote")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")

    _outputs_are_safe = field_validator("output", "scores")(staticmethod(output_path_check))

    @model_validator(mode="after")
    def _one_size(self) -> Options:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of --fraction or --count")
        return self


def run(options: Options) -> int:
    """Load both models and the student's tokenizer; select through `nlm.apps.data_select.select_from_pool`."""
    from pathlib import Path

    import torch

    from nlm.apps.data_select import select_from_pool
    from nlm.config.paths import claim_file, record_file
    from nlm.data.tokenize import TokenizeSettings
    from nlm.models.device import select_device
    from nlm.models.loading import freeze, load_causal_lm, load_tokenizer
    from nlm.models.vocab import shared_vocab_width

    outputs = {"--output": Path(options.output)} | ({"--scores": Path(options.scores)} if options.scores else {})
    for option, path in outputs.items():
        claim_file(path, overwrite=options.overwrite, option=option)
    device = select_device(forced=options.device) if options.device else select_device()
    hub = {"trust_remote_code": options.trust_remote_code}
    tokenizer = load_tokenizer(options.student, **hub)
    student = freeze(load_causal_lm(options.student, dtype=torch.float32, **hub)).to(device)
    teacher = freeze(load_causal_lm(options.teacher, dtype=torch.float32, **hub)).to(device)
    width = shared_vocab_width(load_tokenizer(options.teacher, **hub), tokenizer, teacher, student)
    selection = select_from_pool(
        Path(options.data), teacher, student, tokenizer, by=options.by, output=Path(options.output),
        fraction=options.fraction, count=options.count, scores_file=Path(options.scores) if options.scores else None,
        diverse=options.diverse, settings=TokenizeSettings(max_seq_length=options.max_seq_length),
        batch_size=options.batch_size, max_new_tokens=options.max_new_tokens, vocab_width=width,
    )
    for path in outputs.values():
        record_file(path, "nlm data select")
    generated = f" ({selection.generated} answered by the student)" if selection.generated else ""
    print(f"{options.output}: {len(selection.lines)} of {selection.scored} pool records by {options.by}{generated}")
    return 0
