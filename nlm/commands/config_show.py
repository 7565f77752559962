"""Print the effective training configuration as YAML (secrets hidden).

Takes the same options as `nlm train`; --sources also says where each value came from.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="YAML file of training options")
    sources: bool = Field(False, description="also print where each value came from")
    training_args: list[str] = Field(default_factory=list, json_schema_extra={"training_flags": True})


def run(options: Options) -> int:
    from nlm.config.sources import load_config
    from nlm.config.view import format_config

    loaded = load_config(options.training_args, options.config)
    print(format_config(loaded, sources=options.sources))
    return 0
