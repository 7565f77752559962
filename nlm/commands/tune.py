"""Search distillation settings with Optuna: each trial an `nlm train` run, the best config written as best.yaml.

--config is a training YAML with a `tune:` section (metric, trials, budget, space; see docs/TUNE.md). Trials
run under DIR/trials/<number>/ (DIR: --output_dir, default <output_dir>/tune), --parallel K at a time (one per
GPU when there are GPUs); hopeless trials are pruned from their eval figures; a failing trial is recorded and
the study goes on. The study lives in DIR/tune.db, or in --storage (any SQLAlchemy URL) so that the same
command on several machines joins one study; a re-run continues it. Writes DIR/best.yaml, DIR/tune_report.md
and PNG plots; exits 1 when no trial completed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class Options(BaseModel):
    """Flags of `nlm tune`."""

    model_config = ConfigDict(extra="forbid")
    config: str = Field(description="training YAML with a `tune:` section", json_schema_extra={"file": True})
    trials: int | None = Field(None, ge=1, le=100_000, description="trials in the study, all workers together "
                               "(default: tune.trials)")
    parallel: int | None = Field(None, ge=1, le=1024,
                                 description="trials at a time on this machine (default: one per GPU, or 1 on the CPU)")
    storage: SecretStr | None = Field(None, description="SQLAlchemy URL of the study's database, shared by workers on "
                                      "several machines (default: sqlite file DIR/tune.db)")
    study: str | None = Field(None, min_length=1, max_length=256,
                              description="study name (default: the config file's name without .yaml)")
    output_dir: str | None = Field(None, description="folder of the study's trials and outputs "
                                   "(default: the config's output_dir/tune)")


def run(options: Options) -> int:
    from nlm.tune.study import require_optuna

    require_optuna()  # the install hint before anything else
    from nlm.tune.spec import load_tune

    load_tune(options.config)  # usage errors (exit 2) before heavy imports
    from nlm.tune.study import run_tune

    storage = options.storage.get_secret_value() if options.storage is not None else None
    result = run_tune(options.config, output_dir=options.output_dir, trials=options.trials, parallel=options.parallel,
                      storage=storage, study_name=options.study)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(result.counts.items())) or "no trials"
    print(f"study {result.study_name}: {counts} ({result.wall_seconds:.0f}s)")
    if result.best is not None:
        values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best["params"].items())
        print(f"best: trial {result.best['number']} value {result.best['value']:.6g} {values}")
        print(f"best config: {result.best_yaml}")
    print(f"report: {result.report}")
    return 0 if result.best is not None else 1
