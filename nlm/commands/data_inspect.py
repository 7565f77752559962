"""Count records, formats, skipped lines and token lengths of a JSONL file.

With --config (a training config), count the records of each source of its train_mixture (or train_file)
instead, with each source's weight and sampling probability.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str | None = Field(None, description="a JSONL file", json_schema_extra={"positional": True, "file": True})
    config: str | None = Field(None, description="a training config: per-source counts of its train_mixture")
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
    if options.config or not options.file:
        from nlm.config.sources import load_config
        from nlm.data.inspect import format_sources, inspect_sources
        from nlm.data.mixture import source_specs

        config = load_config([], Path(options.config) if options.config else None).config
        sources = inspect_sources(source_specs(config), tokenizer, TokenizeSettings(max_seq_length=options.max_seq_length))
        print(json.dumps(sources) if options.as_json else format_sources(sources))
        return 0
    path = Path(options.file)
    report = inspect_file(path, tokenizer, TokenizeSettings(max_seq_length=options.max_seq_length))
    print(json.dumps(report) if options.as_json else format_report(path, report))
    return 0
