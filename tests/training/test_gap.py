"""The share of the teacher-baseline gap closed, and `nlm eval --baseline`."""

from __future__ import annotations

import json

import pytest

from nlm.training.gap import gap_closed


def test_gap_closed_is_zero_at_the_baseline_one_at_the_teacher_negative_below():
    teacher, baseline = {"loss": 3.0, "token_accuracy": 0.6}, {"loss": 6.0, "token_accuracy": 0.3}
    assert gap_closed(baseline, teacher, baseline) == {"loss_gap_closed": 0.0, "accuracy_gap_closed": 0.0}
    assert gap_closed(teacher, teacher, baseline) == {"loss_gap_closed": 1.0, "accuracy_gap_closed": 1.0}
    assert gap_closed({"loss": 5.0, "token_accuracy": 0.33}, teacher, baseline) == pytest.approx(
        {"loss_gap_closed": 1 / 3, "accuracy_gap_closed": 0.1})
    assert gap_closed({"loss": 7.2, "token_accuracy": 0.2}, teacher, baseline)["loss_gap_closed"] == pytest.approx(-0.4)
    assert gap_closed(teacher, baseline, teacher)["loss_gap_closed"] is None  # no gap to close


@pytest.mark.slow
def test_eval_with_baseline_prints_the_gap_closed(model_dirs, pc_file, capsys):
    from nlm.cli import main

    args = ["eval", "--model", str(model_dirs["student"]), "--data", str(pc_file), "--teacher", str(model_dirs["teacher"])]
    assert main([*args, "--baseline", str(model_dirs["student"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the model is its own baseline: it closes none of the gap; the teacher's figures are its own evaluation
    assert result["loss_gap_closed"] == pytest.approx(0.0, abs=1e-6) or result["loss_gap_closed"] is None
    alone = main(["eval", "--model", str(model_dirs["teacher"]), "--data", str(pc_file), "--json"])
    assert alone == 0 and json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result["teacher_loss"])
    assert main([*args[:5], "--baseline", str(model_dirs["student"])]) == 2
    assert "pass --teacher too" in capsys.readouterr().err
