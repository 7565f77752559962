"""Train a team of students from one pipeline file, side by side.

PIPELINE.yaml holds `defaults:` (any training option) and `agents:` (each a `name` plus its own overrides,
and optionally `devices: N` for a torchrun job). Each agent trains into output_dir/<name>/ exactly as
`nlm train` would; shared tokenised data (and, with `teacher_cache:`, a shared teacher cache) is built once.
Agents run in separate processes — one per GPU, or --parallel N at a time on the CPU; a failing agent does not
stop the others. Writes output_dir/pipeline_report.json and .md; exits 1 if any agent failed. A re-run skips
finished agents (unless --overwrite) and resumes unfinished ones.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    """Flags of `nlm pipeline run`."""

    model_config = ConfigDict(extra="forbid")
    pipeline: str = Field(description="the pipeline YAML file", json_schema_extra={"positional": True})
    only: list[str] = Field(default_factory=list, description="run only these agents (repeatable)")
    parallel: int | None = Field(None, ge=1, le=1024,
                                 description="agents at a time (default: one per GPU, or 1 on the CPU)")
    overwrite: bool = Field(False, description="train finished agents again, replacing their run folders")


def run(options: Options) -> int:
    from nlm.pipeline.run import run_pipeline

    result = run_pipeline(options.pipeline, only=options.only, parallel=options.parallel, overwrite=options.overwrite)
    for agent in result.agents:
        where = agent.final_dir or agent.output_dir
        print(f"{agent.name}: {agent.status}" + (f" ({agent.error})" if agent.error else f" -> {where}"))
    print(f"report: {result.report}")
    return 1 if result.failed else 0
