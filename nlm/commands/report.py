"""Plot and tabulate training runs: loss parts, learning rate, eval metrics, throughput.

Writes report.png (curves over steps, one line style per run) and report.md (a summary table) for
RUN_DIR and every --compare RUN_DIR, into --output (default RUN_DIR/report). Reads finished runs and,
from their newest checkpoint, unfinished ones.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nlm.config.paths import output_path_check


class Options(BaseModel):
    """The flags of `nlm report`."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="a run folder (output_dir/run_name)", json_schema_extra={"positional": True})
    compare: list[str] = Field(default_factory=list, description="more run folders to draw in the same report")
    output: str | None = Field(None, description="folder for report.png and report.md (default: RUN_DIR/report)")

    _output_is_safe = field_validator("output")(staticmethod(output_path_check))


def run(options: Options) -> int:
    """Write the report through `nlm.apps.run_report.write_report`; print the table and where it went."""
    from nlm.apps.run_report import markdown_table, write_report

    result = write_report([options.run_dir, *options.compare], options.output)
    print(markdown_table(result["rows"]))
    print(f"report: {result['markdown']}" + (f"  (plot: {result['png']})" if result["png"] else ""))
    return 0
