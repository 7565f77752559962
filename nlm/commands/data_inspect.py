"""Count records, formats, skipped lines and token lengths of a JSONL file."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="a JSONL file", json_schema_extra={"positional": True, "file": True})
    tokenizer: str | None = Field(None, description="tokenizer (hub id or folder) for token-length statistics")
    max_seq_length: int = Field(512, ge=1, description="length that counts as truncated")
    as_json: bool = Field(False, alias="json", description="print one JSON object")
    trust_remote_code: bool = Field(False, description="run tokenizer code shipped with a hub repository")


def run(options: Options) -> int:
    import json
    from pathlib import Path

    from nlm.data.inspect import format_report, inspect_file
    from nlm.data.tokenize import TokenizeSettings

    tokenizer = None
    if options.tokenizer:
        from nlm.models.loading import load_tokenizer

        tokenizer = load_tokenizer(options.tokenizer, trust_remote_code=options.trust_remote_code)
    path = Path(options.file)
    report = inspect_file(path, tokenizer, TokenizeSettings(max_seq_length=options.max_seq_length))
    print(json.dumps(report) if options.as_json else format_report(path, report))
    return 0
