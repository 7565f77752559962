"""`nlm report`: loss parts, learning rate, eval metrics, throughput and memory over steps, for one or more runs.

Reads each run's log history: final/training_metadata.json when the run finished, else the newest
checkpoint's trainer_state.json (a run still going or stopped). Writes report.png (matplotlib) and
report.md (a summary table) into the output folder; it replaces only a report it wrote before.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlm.config.paths import safe_output_dir
from nlm.errors import ConfigError, RunExistsError
from nlm.models.model_info import METADATA_FILE

logger = logging.getLogger(__name__)

MARKER = "<!-- written by nlm report -->"
# (panel title, y label, keys plotted in it); a panel with no data in any run is left out.
PANELS = (
    ("training loss", "loss", ("loss", "task_loss", "distill_loss")),
    ("learning rate", "lr", ("learning_rate",)),
    ("evaluation", "value", ("eval_loss", "eval_teacher_kl", "eval_token_accuracy", "eval_teacher_agreement")),
    ("throughput", "tokens/s", ("tokens_per_second",)),
    ("memory", "MB", ("sys_rss_mb", "gpu_mem_allocated_mb", "gpu_mem_peak_mb", "mps_allocated_mb")),
    ("gradient norm", "norm", ("grad_norm",)),
)


@dataclass
class RunHistory:
    name: str
    path: Path
    history: list[dict[str, Any]]
    metadata: dict[str, Any]
    finished: bool

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(e["step"]), float(e[key])) for e in self.history
                if key in e and "step" in e and isinstance(e[key], (int, float))]


def _checkpoint_number(path: Path) -> int:
    match = re.search(r"checkpoint-(\d+)$", path.name)
    return int(match.group(1)) if match else -1


def load_run(run_dir: str | Path) -> RunHistory:
    """The log history of a run folder (or its final/ folder)."""
    path = Path(run_dir).expanduser()
    if path.name == "final" and (path / METADATA_FILE).is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{run_dir}: run folder not found")
    metadata_file = path / "final" / METADATA_FILE
    if metadata_file.is_file():
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
        return RunHistory(path.name, path.resolve(), metadata.get("log_history", []), metadata, True)
    checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=lambda p: _checkpoint_number(p.parent))
    if checkpoints:
        state = json.loads(checkpoints[-1].read_text(encoding="utf-8"))
        return RunHistory(path.name, path.resolve(), state.get("log_history", []), {}, False)
    raise ConfigError(f"{run_dir}: no final/{METADATA_FILE} and no checkpoint-N/trainer_state.json "
                      "(expected an nlm run folder)")


def _last(run: RunHistory, key: str) -> float | None:
    points = run.series(key)
    return points[-1][1] if points else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def summary_rows(runs: list[RunHistory]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        eval_losses = [v for _, v in run.series("eval_loss")]
        speeds = [v for _, v in run.series("tokens_per_second")]
        memory = [v for _, v in run.series("sys_rss_mb")]
        steps = [int(e["step"]) for e in run.history if "step" in e]
        rows.append({
            "run": run.name, "finished": run.finished, "steps": max(steps) if steps else 0,
            "final_train_loss": _last(run, "loss"),
            "best_eval_loss": min(eval_losses) if eval_losses else None,
            "final_eval_loss": eval_losses[-1] if eval_losses else None,
            "final_eval_token_accuracy": _last(run, "eval_token_accuracy"),
            "final_eval_teacher_kl": _last(run, "eval_teacher_kl"),
            "mean_tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
            "peak_rss_mb": max(memory) if memory else None,
            "wall_seconds": run.metadata.get("wall_seconds"),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = [("run", "run"), ("steps", "steps"), ("final_train_loss", "train loss"), ("best_eval_loss", "best eval loss"),
               ("final_eval_loss", "final eval loss"), ("final_eval_token_accuracy", "eval token acc."),
               ("final_eval_teacher_kl", "eval teacher KL"), ("mean_tokens_per_second", "tokens/s"),
               ("peak_rss_mb", "peak RSS MB"), ("wall_seconds", "wall s")]
    lines = ["| " + " | ".join(label for _, label in columns) + " |",
             "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [f"{row['run']}{'' if row['finished'] else ' (unfinished)'}", str(row["steps"])]
        cells += [_fmt(row[key]) if key != "mean_tokens_per_second" else _fmt(row[key], 1) for key, _ in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(runs: list[RunHistory], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'nlm[plot]'): no PNG written")
        return False
    panels = [p for p in PANELS if any(run.series(key) for run in runs for key in p[2])]
    if not panels:
        return False
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for axis, (title, ylabel, keys) in zip(axes.flat, panels, strict=False):
        for index, run in enumerate(runs):
            for key in keys:
                points = run.series(key)
                if points:
                    label = key if len(runs) == 1 else f"{run.name}: {key}"
                    axis.plot(*zip(*points, strict=True), styles[index % len(styles)], marker="." if len(points) < 30 else None,
                              label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def write_report(run_dirs: list[str | Path], output: str | Path | None = None) -> dict[str, Any]:
    """report.png + report.md for `run_dirs` in `output` (default: the first run's report/ folder)."""
    runs = [load_run(d) for d in run_dirs]
    folder = safe_output_dir(output if output is not None else runs[0].path / "report")
    markdown_path, png_path = folder / "report.md", folder / "report.png"
    if markdown_path.exists() and MARKER not in markdown_path.read_text(encoding="utf-8", errors="replace"):
        raise RunExistsError(f"{markdown_path} exists and was not written by nlm report; choose another --output")
    if png_path.exists() and not markdown_path.exists():
        raise RunExistsError(f"{png_path} exists and was not written by nlm report; choose another --output")
    folder.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs)
    plotted = plot_runs(runs, png_path)
    lines = [MARKER, "# Training report", "", markdown_table(rows), ""]
    lines += ["Runs: " + ", ".join(f"`{run.path}`" for run in runs), ""]
    if plotted:
        lines += ["![loss parts, learning rate, eval metrics, throughput and memory over steps](report.png)", ""]
    markdown_path.write_text("\n".join(lines), encoding="utf-8")
    logger.info("report written to %s", markdown_path)
    return {"markdown": str(markdown_path), "png": str(png_path) if plotted else None, "rows": rows}
