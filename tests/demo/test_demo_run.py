import json
import subprocess
import sys

import pytest

from nlm.cli import main


def test_data_only_writes_data_and_tokenizer(tmp_path, capsys):
    assert main(["demo", "--data-only", "--output_dir", str(tmp_path / "d")]) == 0
    for name in ("teacher_train.jsonl", "student_train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "d" / "data" / name).stat().st_size > 0
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").is_file()
    assert main(["demo", "--data-only", "--output_dir", str(tmp_path / "d")]) == 2
    assert "already holds a demo; pass --overwrite" in capsys.readouterr().err
    assert main(["demo", "--data-only", "--output_dir", str(tmp_path / "d"), "--overwrite"]) == 0


@pytest.mark.slow
def test_quick_demo_trains_and_evaluates_all_three(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "nlm.cli", "demo", "--quick", "--output_dir", str(out), "--seed", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("teacher", "student_kd", "student_ce"):
        entry = report[key]
        assert {"accuracy", "loss", "params", "seconds"} <= set(entry)
        assert 0 <= entry["accuracy"] <= 1 and entry["loss"] > 0 and entry["params"] > 0 and entry["seconds"] > 0
        assert (out / "runs" / key / "final" / "training_metadata.json").is_file()
    assert "gap_closed" in report
    assert report["teacher"]["params"] > report["student_kd"]["params"] == report["student_ce"]["params"]
    assert (out / "report.md").read_text().startswith("# nlm demo report")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nlm serve --model" in result.stdout and "distillation closed" in result.stdout
    metadata = json.loads((out / "runs" / "student_ce" / "final" / "training_metadata.json").read_text())
    assert metadata["config"]["distillation"]["alpha"] == 0.0


def test_unknown_task_is_a_usage_error_naming_the_choices(tmp_path, capsys):
    assert main(["demo", "--task", "nope", "--data-only", "--output_dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--task" in err and "colours" in err and "reverse" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_data_only_reverse_task_writes_its_own_data(tmp_path):
    assert main(["demo", "--task", "reverse", "--data-only", "--output_dir", str(tmp_path / "d")]) == 0
    row = json.loads((tmp_path / "d" / "data" / "heldout.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("reverse: ") and row["completion"].split() == row["prompt"].split()[1:][::-1]


@pytest.mark.slow
def test_quick_reverse_demo_reports_on_policy_next_to_off_policy(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "nlm.cli", "demo", "--task", "reverse", "--quick", "--output_dir",
                             str(out), "--seed", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "reverse"
    for key in ("teacher", "student_kd", "student_on_policy", "student_ce"):
        assert 0 <= report[key]["accuracy"] <= 1 and report[key]["loss"] > 0
    assert report["on_policy_gain"] == report["student_on_policy"]["accuracy"] - report["student_kd"]["accuracy"]
    on_policy = json.loads((out / "runs" / "student_on_policy" / "final" / "training_metadata.json").read_text())
    off_policy = json.loads((out / "runs" / "student_kd" / "final" / "training_metadata.json").read_text())
    assert on_policy["config"]["distillation"]["lmbda"] == report["student_on_policy"]["lmbda"] > 0
    assert off_policy["config"]["distillation"]["lmbda"] == 0
    for key in ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "student_model", "train_file"):
        assert on_policy["config"][key] == off_policy["config"][key]  # the same budget
    assert "on-policy student (lmbda=" in result.stdout and "on-policy minus off-policy" in result.stdout
    assert "on-policy student" in (out / "report.md").read_text()


def test_demo_never_deletes_a_users_folder_or_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    for extra in ([], ["--overwrite"]):
        assert main(["demo", "--data-only", "--output_dir", str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert "was not created by nlm (it holds thesis.txt)" in err and len(err.strip().splitlines()) == 1
    assert (mine / "thesis.txt").read_text() == "four years of work"

    demo = tmp_path / "demo"
    assert main(["demo", "--data-only", "--output_dir", str(demo)]) == 0
    (demo / "thesis.txt").write_text("saved next to the demo")
    (demo / "data" / "my_extra.jsonl").write_text("{}\n")  # inside a folder nlm owns: kept too
    (demo / "tokenizer" / "notes.md").write_text("vocab notes")
    assert main(["demo", "--data-only", "--output_dir", str(demo), "--overwrite"]) == 0
    assert (demo / "thesis.txt").read_text() == "saved next to the demo"
    assert (demo / "data" / "my_extra.jsonl").read_text() == "{}\n"
    assert (demo / "tokenizer" / "notes.md").read_text() == "vocab notes"
    assert (demo / "data" / "heldout.jsonl").is_file()
    assert main(["demo", "--data-only", "--output_dir", str(demo), "--overwrite"]) == 0  # and again: still theirs
    assert (demo / "data" / "my_extra.jsonl").is_file() and (demo / "tokenizer" / "notes.md").is_file()
