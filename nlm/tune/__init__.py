"""`nlm tune`: search training options with Optuna; every trial is an ordinary `nlm train` run.

spec.py (the `tune:` section of a training YAML: metric, budget, space, checked against TrainingConfig),
shared.py (work the trials share: tokenised data, one teacher cache when the space allows it),
trial.py (one trial: its config, the `nlm train` child, eval figures reported to Optuna, pruning),
study.py (storage, sampler, pruner, the study run over K slots), report.py (best.yaml, tune_report.md, plots).
"""
