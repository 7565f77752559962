"""Register a final/ or export folder as a new version in an MLflow model registry.

Lineage from training_metadata.json (teacher, student, data hashes, loss settings, git commit, eval metrics)
goes in as params, tags and metrics. --alias points an alias (e.g. champion) at the new version;
with --only_if_better METRIC it moves only when METRIC improves on the alias's current version
(lower is better for metrics named *loss*, *perplexity*, *kl*; higher for the rest).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    """The flags of `nlm publish`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a run folder, its final/ folder, or an nlm export folder")
    name: str = Field(min_length=1, max_length=256, description="registered model name")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI), "
                                                       "e.g. sqlite:///mlflow.db")
    alias: str | None = Field(None, description="alias to point at the new version, e.g. champion")
    only_if_better: str | None = Field(None, description="move the alias only if this metric improves, e.g. eval_loss")


def run(options: Options) -> int:
    """Publish through `nlm.apps.publish.publish_model`; print the version and the alias decision."""
    import json

    from nlm.apps.publish import publish_model

    result = publish_model(options.model, options.name, tracking_uri=options.tracking_uri, alias=options.alias,
                           only_if_better=options.only_if_better)
    print(json.dumps({"name": result.name, "version": result.version, "run_id": result.run_id,
                      "alias": result.alias, "alias_moved": result.alias_moved, "reason": result.reason}))
    return 0
