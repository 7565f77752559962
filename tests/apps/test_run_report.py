"""nlm report: PNG + Markdown table from finished and unfinished runs' log histories."""

import json

import pytest

from nlm.apps.run_report import load_run, write_report
from nlm.commands.report import Options, run
from nlm.errors import ConfigError, RunExistsError


def _history(offset):
    history = []
    for step in (1, 2, 4, 6):
        history.append({"step": step, "loss": 3 - step * 0.3 + offset, "task_loss": 2.0, "distill_loss": 1.0,
                        "learning_rate": 1e-3 / step, "tokens_per_second": 100.0 + step, "sys_rss_mb": 500.0 + step})
    history.append({"step": 6, "eval_loss": 1.5 + offset, "eval_token_accuracy": 0.4, "eval_teacher_kl": 0.2})
    return history


def _finished(tmp_path, name, offset=0.0):
    final = tmp_path / name / "final"
    final.mkdir(parents=True)
    (final / "training_metadata.json").write_text(json.dumps({"log_history": _history(offset), "wall_seconds": 12.5}))
    return tmp_path / name


def test_report_compares_runs_in_one_png_and_table(tmp_path, capsys):
    first, second = _finished(tmp_path, "kd"), _finished(tmp_path, "ce", offset=0.5)
    unfinished = tmp_path / "running" / "checkpoint-4"
    unfinished.mkdir(parents=True)
    (unfinished / "trainer_state.json").write_text(json.dumps({"log_history": _history(1.0)[:3]}))

    assert run(Options(run_dir=str(first), compare=[str(second), str(tmp_path / "running")])) == 0
    png = first / "report" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    markdown = (first / "report" / "report.md").read_text()
    assert "| kd | 6 | 1.2000 | 1.5000 | 1.5000 | 0.4000 | 0.2000 | 103.2 | 506.0000 | 12.5000 |" in markdown
    assert "| running (unfinished) | 4 |" in markdown
    assert "| ce | 6 |" in capsys.readouterr().out


def test_report_refuses_what_it_did_not_write_and_bad_folders(tmp_path):
    run_dir = _finished(tmp_path, "kd")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    with pytest.raises(RunExistsError, match="not written by nlm report"):
        write_report([run_dir], tmp_path / "mine")
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes"
    write_report([run_dir])
    write_report([run_dir])  # its own earlier report is replaced
    with pytest.raises(ConfigError, match="expected an nlm run folder"):
        load_run(tmp_path / "mine")
    with pytest.raises(ConfigError, match="run folder not found"):
        load_run(tmp_path / "nope")


def test_nlm_report_on_the_command_line(tmp_path, capsys):
    from nlm.cli import main

    run_dir = _finished(tmp_path, "kd")
    assert main(["report", str(run_dir), "--output", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.png").is_file() and "| kd | 6 |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
