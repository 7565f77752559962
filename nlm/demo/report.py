"""The demo's results: a table on the terminal, report.md, report.json and a PNG of curves and scores."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("nlm.demo")

ROWS = (("teacher", "teacher"), ("student_kd", "distilled student"), ("student_on_policy", "on-policy student"),
        ("student_ce", "fine-tuned student (alpha=0)"))
TASK_ANSWERS = {"colours": "each object's most likely colour", "reverse": "the word's letters in reverse order"}
SHORT = {"teacher": "teacher", "student_kd": "distilled", "student_on_policy": "on-policy", "student_ce": "fine-tuned"}
COLOURS = {"teacher": "#555555", "student_kd": "#2a7ab9", "student_on_policy": "#3a9a5b", "student_ce": "#d98c2b"}


def _rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The models this demo trained, in order; the on-policy row names its lmbda."""
    rows = []
    for key, label in ROWS:
        if key in results:
            lmbda = results[key].get("lmbda")
            rows.append((key, f"{label} (lmbda={lmbda:g})" if lmbda is not None else label))
    return rows


def _on_policy_line(results: dict[str, Any]) -> str | None:
    gain = results.get("on_policy_gain")
    if gain is None:
        return None
    return (f"on-policy minus off-policy distillation: {gain:+.3f} held-out exact match "
            f"(same models, labels and steps)")


def format_table(results: dict[str, Any]) -> str:
    header = f"{'model':<30} {'accuracy':>9} {'loss':>8} {'params':>10} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for key, label in _rows(results):
        r = results[key]
        lines.append(f"{label:<30} {r['accuracy']:>9.3f} {r['loss']:>8.4f} {r['params']:>10,} {r['seconds']:>8.1f}")
    gap = results.get("gap_closed")
    gap_text = f"{gap:.0%}" if gap is not None else "n/a (the teacher is not ahead of the baseline)"
    lines.append(f"distillation closed {gap_text} of the teacher-baseline accuracy gap")
    if (on_policy := _on_policy_line(results)) is not None:
        lines.append(on_policy)
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
    rows = _rows(results)
    for key, label in rows:
        points = [(e["step"], e["task_loss"]) for e in histories[key] if "task_loss" in e]
        if points:
            curves.plot(*zip(*points, strict=True), label=label)
    curves.set_xlabel("step")
    curves.set_ylabel("training cross-entropy on labels")
    curves.set_title("training curves")
    curves.legend()
    values = [results[key]["accuracy"] for key, _ in rows]
    bars = scores.bar(range(len(rows)), values, color=[COLOURS[key] for key, _ in rows])
    scores.set_xticks(range(len(rows)), [SHORT[key] for key, _ in rows])
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
        f"Task {results.get('task', 'colours')}, seed {results['seed']}{' (quick mode)' if results['quick'] else ''}. "
        "Held-out prompts never appear in training; accuracy is greedy exact match against the expected answer "
        f"({TASK_ANSWERS.get(results.get('task', 'colours'), 'the reference completion')}), loss is per-token "
        "cross-entropy on those answers.",
        "",
        "| model | accuracy | loss | perplexity | params | train seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in _rows(results):
        r = results[key]
        markdown.append(f"| {label} | {r['accuracy']:.3f} | {r['loss']:.4f} | {r['perplexity']:.3f} | {r['params']:,} | {r['seconds']:.1f} |")
    gap = results.get("gap_closed")
    markdown += ["", f"Gap closed by distillation: {gap:.0%}." if gap is not None else "Gap closed: n/a.", ""]
    if (on_policy := _on_policy_line(results)) is not None:
        markdown += [on_policy[0].upper() + on_policy[1:] + ".", ""]
    if plotted:
        markdown += ["![training curves and scores](curves.png)", ""]
    (root / "report.md").write_text("\n".join(markdown), encoding="utf-8")
    print()
    print(table)
    print()
    print(f"report: {root / 'report.md'}  ({root / 'report.json'}{', ' + str(root / 'curves.png') if plotted else ''})")
    print(f"serve the distilled student:  nlm serve --model {results['student_kd']['model']}")
