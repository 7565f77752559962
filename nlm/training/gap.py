"""The share of the teacher-baseline gap a student closes: the figure distillation runs are compared by.

    loss:      (L_baseline - L_student) / (L_baseline - L_teacher)
    accuracy:  (A_student - A_baseline) / (A_teacher - A_baseline)

1 is a student as good as its teacher, 0 one no better than the baseline (usually plain fine-tuning of the
same student at the same budget), below 0 one worse than the baseline. None when the teacher is no better
than the baseline (no gap to close).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nlm.errors import ConfigError


def _share(student: float, teacher: float, baseline: float, lower_is_better: bool) -> float | None:
    gap = (baseline - teacher) if lower_is_better else (teacher - baseline)
    if gap <= 0:
        return None
    closed = (baseline - student) if lower_is_better else (student - baseline)
    return closed / gap


def gap_closed(student: dict[str, Any], teacher: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """`loss_gap_closed` and `accuracy_gap_closed` from three evaluations (`loss`, `token_accuracy`)."""
    out: dict[str, float | None] = {}
    for key, name, lower in (("loss", "loss_gap_closed", True), ("token_accuracy", "accuracy_gap_closed", False)):
        if all(key in result for result in (student, teacher, baseline)):
            out[name] = _share(float(student[key]), float(teacher[key]), float(baseline[key]), lower)
    return out


def gap_against(student: dict[str, Any], teacher: str | None, baseline: str,
                evaluate: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """`nlm eval --baseline`: the teacher's and the baseline's own figures (by `evaluate`, on the same data) and
    the share of the gap between them that `student` closes."""
    if teacher is None:
        raise ConfigError("--baseline measures the share of the teacher-baseline gap closed: pass --teacher too")
    teacher_result, baseline_result = evaluate(teacher), evaluate(baseline)
    out: dict[str, Any] = {"teacher_loss": teacher_result["loss"], "teacher_token_accuracy": teacher_result["token_accuracy"],
                           "baseline_loss": baseline_result["loss"],
                           "baseline_token_accuracy": baseline_result["token_accuracy"]}
    out.update(gap_closed(student, teacher_result, baseline_result))
    return out
