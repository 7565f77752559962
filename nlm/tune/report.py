"""What a study leaves in DIR: best.yaml (ready for `nlm train --config`), tune_report.md (every trial: values,
metric, state, time, error) and PNG plots from Optuna's matplotlib visualisations."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("nlm.tune")

# Optuna's matplotlib plots written as DIR/<name>.png; each needs enough finished trials (skipped otherwise).
PLOTS = {
    "history": "plot_optimization_history",
    "importances": "plot_param_importances",
    "slices": "plot_slice",
    "intermediate": "plot_intermediate_values",
}


def write_outputs(study: Any, setup: Any, root: Path, url: str, wall_seconds: float) -> dict[str, Any]:
    """best.yaml, tune_report.md and the plots; returns the best trial, the counts by state and the paths."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = None
    best_yaml = None
    if complete:
        chosen = study.best_trial
        best = {"number": chosen.number, "value": chosen.value, "params": dict(chosen.params)}
        best_yaml = _write_atomic(root / "best.yaml", _best_yaml_text(setup, chosen, study))
    plots = write_plots(study, root) if complete else []
    report = _write_atomic(root / "tune_report.md", _report_text(study, setup, trials, counts, best, url, wall_seconds, plots))
    return {"best": best, "counts": counts, "report": report, "best_yaml": best_yaml, "plots": plots}


def _best_yaml_text(setup: Any, trial: Any, study: Any) -> str:
    header = (f"# nlm tune: study {study.study_name}, trial {trial.number}, {setup.spec.metric_key} = {trial.value:.6g}\n"
              f"# the options of {setup.path} with the best values; train it with: nlm train --config best.yaml\n")
    return header + yaml.safe_dump(setup.best_document(dict(trial.params)), sort_keys=False)


def write_plots(study: Any, root: Path) -> list[str]:
    """One PNG per plot Optuna can draw for this study; a plot it cannot draw yet is skipped with a log line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as views
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): no plots written")
        return []
    import warnings

    written = []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning on every matplotlib view
                axes = getattr(views, function)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), 5)
            figure.savefig(root / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(f"{name}.png")
        except Exception as exc:  # noqa: BLE001 - e.g. importances need two finished trials with varied values
            logger.info("plot %s skipped: %s", name, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return written


def _report_text(study: Any, setup: Any, trials: list[Any], counts: dict[str, int], best: dict[str, Any] | None,
                 url: str, wall_seconds: float, plots: list[str]) -> str:
    spec = setup.spec
    keys = [dimension.key for dimension in setup.dimensions]
    lines = [f"# nlm tune: {study.study_name}", "",
             f"- config: `{setup.path}`; storage: `{shown_url(url)}`",
             f"- metric: `{spec.metric_key}` ({spec.resolved_direction}); sampler: {spec.sampler}; pruner: {spec.pruner}; "
             f"budget per trial: {spec.budget or 'the run as configured'}",
             "- trials: " + (", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"),
             f"- wall time of this `nlm tune` run: {wall_seconds:.1f} s"]
    if best is not None:
        values = ", ".join(f"{k} = {_cell(v)}" for k, v in best["params"].items())
        lines.append(f"- best: trial {best['number']}, {spec.metric_key} = {best['value']:.6g} ({values}) -> `best.yaml`")
    else:
        lines.append("- best: none yet (no trial completed)")
    lines += ["", "| trial | state | " + " | ".join(f"`{k}`" for k in keys) + f" | {spec.metric_key} | seconds | note |",
              "|---:|---|" + "---:|" * len(keys) + "---:|---:|---|"]
    for trial in sorted(trials, key=lambda t: t.number):
        note = trial.user_attrs.get("error") or (f"pruned at step {trial.user_attrs['pruned_at']}"
                                                  if "pruned_at" in trial.user_attrs else "")
        value = trial.value if trial.value is not None else _last(trial)
        mark = "**" if best is not None and trial.number == best["number"] else ""
        cells = [f"{mark}{trial.number}{mark}", trial.state.name.lower(), *[_cell(trial.params.get(k)) for k in keys],
                 _cell(value), _cell(trial.user_attrs.get("seconds")), note.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "Plots (Optuna's matplotlib views): " + ", ".join(f"[{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def _last(trial: Any) -> float | None:
    steps = trial.intermediate_values
    return steps[max(steps)] if steps else None


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_atomic(path: Path, text: str) -> Path:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def shown_url(url: str) -> str:
    """A storage URL as shown to users: its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "the storage"
