"""The demo's results: a table on the terminal, report.md, report.json and a PNG of curves and scores."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("nlm.demo")

ROWS = (("teacher", "teacher"), ("student_kd", "distilled student"), ("student_ce", "fine-tuned student (alpha=0)"))


def format_table(results: dict[str, Any]) -> str:
    header = f"{'model':<30} {'accuracy':>9} {'loss':>8} {'params':>10} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for key, label in ROWS:
        r = results[key]
        lines.append(f"{label:<30} {r['accuracy']:>9.3f} {r['loss']:>8.4f} {r['params']:>10,} {r['seconds']:>8.1f}")
    gap = results.get("gap_closed")
    gap_text = f"{gap:.0%}" if gap is not None else "n/a (the teacher is not ahead of the baseline)"
    lines.append(f"distillation closed {gap_text} of the teacher-baseline accuracy gap")
    return "\n".join(lines)


def _plot(path: Path, results: dict[str, Any], histories: dict[str, list[dict]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'nlm[plot]'): no plot written")
        return False
    figure, (curves, scores) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in ROWS:
        points = [(e["step"], e["task_loss"]) for e in histories[key] if "task_loss" in e]
        if points:
            curves.plot(*zip(*points, strict=True), label=label)
    curves.set_xlabel("step")
    curves.set_ylabel("training cross-entropy on labels")
    curves.set_title("training curves")
    curves.legend()
    values = [results[key]["accuracy"] for key, _ in ROWS]
    bars = scores.bar(range(3), values, color=["#555555", "#2a7ab9", "#d98c2b"])
    scores.set_xticks(range(3), ["teacher", "distilled", "fine-tuned"])
    scores.set_ylim(0, 1.12)
    scores.set_ylabel("held-out exact-match accuracy")
    scores.set_title("held-out accuracy")
    for bar, value in zip(bars, values, strict=True):
        scores.text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.2f}", ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(root: Path, results: dict[str, Any], histories: dict[str, list[dict]]) -> None:
    table = format_table(results)
    (root / "report.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plotted = _plot(root / "curves.png", results, histories)
    markdown = [
        "# nlm demo report",
        "",
        f"Seed {results['seed']}{' (quick mode)' if results['quick'] else ''}. Held-out prompts never appear in training; "
        "accuracy is greedy exact match against each object's most likely colour, loss is per-token cross-entropy "
        "on those answers.",
        "",
        "| model | accuracy | loss | perplexity | params | train seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        r = results[key]
        markdown.append(f"| {label} | {r['accuracy']:.3f} | {r['loss']:.4f} | {r['perplexity']:.3f} | {r['params']:,} | {r['seconds']:.1f} |")
    gap = results.get("gap_closed")
    markdown += ["", f"Gap closed by distillation: {gap:.0%}." if gap is not None else "Gap closed: n/a.", ""]
    if plotted:
        markdown += ["![training curves and scores](curves.png)", ""]
    (root / "report.md").write_text("\n".join(markdown), encoding="utf-8")
    print()
    print(table)
    print()
    print(f"report: {root / 'report.md'}  ({root / 'report.json'}{', ' + str(root / 'curves.png') if plotted else ''})")
    print(f"serve the distilled student:  nlm serve --model {results['student_kd']['model']}")
