"""`nlm tune` end to end: real Optuna, a real sqlite file, real `nlm train` child processes on tiny models."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from nlm.cli import main

pytestmark = pytest.mark.slow

SPACE = {"distillation.alpha": {"low": 0.1, "high": 0.9}, "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}


def _tune_file(tmp_path, model_dirs, pc_file, space=None, **tune):
    document = {"student_model": str(model_dirs["student"]), "teacher_model": str(model_dirs["teacher"]),
                "train_file": str(pc_file), "eval_split": 0.25, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                "device_preference": ["cpu"], "logging_steps": 2, "output_dir": str(tmp_path / "out"),
                "tune": {"trials": 3, "seed": 0, "startup_trials": 1, "budget": {"max_steps": 4, "eval_steps": 2},
                         "space": space or SPACE, **tune}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _trial_folders(root):
    return sorted(int(p.name) for p in (root / "trials").iterdir() if p.name.isdigit())


def _study(storage, name):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def test_a_study_writes_best_yaml_that_nlm_train_accepts(tmp_path, model_dirs, pc_file, capsys):
    config = _tune_file(tmp_path, model_dirs, pc_file, pruner="none")
    assert main(["tune", "--config", str(config), "--parallel", "2"]) == 0
    root = tmp_path / "out" / "tune"
    study = _study(f"sqlite:///{root / 'tune.db'}", "run")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 and _trial_folders(root) == [0, 1, 2]
    for trial in study.trials:  # each trial an ordinary run with the sampled values and the budget
        metadata = json.loads((root / "trials" / str(trial.number) / "final" / "training_metadata.json").read_text())
        assert metadata["config"]["distillation"]["alpha"] == trial.params["distillation.alpha"]
        assert metadata["config"]["max_steps"] == 4 and metadata["final_metrics"]["eval_loss"] == trial.value
        assert sorted(trial.intermediate_values) == [2, 4]  # both evals reported to Optuna
        # one teacher cache for all trials (alpha and the learning rate do not change it)
        assert metadata["teacher"]["kind"] == "cache"
    assert len({json.loads((root / "trials" / str(n) / "final" / "training_metadata.json").read_text())["teacher"]
                ["teacher_cache"] for n in range(3)}) == 1
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert best["distillation"]["alpha"] == study.best_params["distillation.alpha"]
    assert "tune" not in best and "max_steps" not in best
    report = (root / "tune_report.md").read_text()
    assert report.count("| complete |") == 3 and f"**{study.best_trial.number}**" in report
    assert all((root / f"{name}.png").stat().st_size > 1000 for name in ("history", "importances", "slices"))
    out = capsys.readouterr().out
    assert f"best config: {root / 'best.yaml'}" in out
    assert main(["train", "--config", str(root / "best.yaml"), "--max_steps", "2", "--save_strategy", "no"]) == 0
    trained = json.loads((tmp_path / "out" / "distill" / "final" / "training_metadata.json").read_text())
    assert trained["config"]["learning_rate"] == pytest.approx(study.best_params["learning_rate"])
    # Re-running with the default local storage (DIR/tune.db) continues the study: one trial more, the three
    # earlier ones untouched; at its count a re-run only rewrites the report; another study name is refused.
    earlier = {n: (root / "trials" / str(n) / "final").stat().st_mtime for n in range(3)}
    assert main(["tune", "--config", str(config), "--trials", "4"]) == 0
    study = _study(f"sqlite:///{root / 'tune.db'}", "run")
    assert [t.number for t in study.trials] == [0, 1, 2, 3] and _trial_folders(root) == [0, 1, 2, 3]
    assert {n: (root / "trials" / str(n) / "final").stat().st_mtime for n in range(3)} == earlier
    assert main(["tune", "--config", str(config), "--trials", "4"]) == 0
    assert len(_study(f"sqlite:///{root / 'tune.db'}", "run").trials) == 4 and _trial_folders(root) == [0, 1, 2, 3]
    assert (root / "tune_report.md").read_text().count("| complete |") == 4
    capsys.readouterr()
    assert main(["tune", "--config", str(config), "--study", "other"]) == 2
    assert "holds the study 'run'" in capsys.readouterr().err


def _worker(config, root, storage, trials):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nlm.cli", "tune", "--config", str(config), "--output_dir", str(root),
                             "--storage", storage, "--study", "shared", "--trials", str(trials)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_workers_share_one_study_and_a_rerun_continues_it(tmp_path, model_dirs, pc_file):
    config = _tune_file(tmp_path, model_dirs, pc_file, pruner="none")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    roots = [tmp_path / "machine_a", tmp_path / "machine_b"]
    workers = [_worker(config, root, storage, 3) for root in roots]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
    numbers = [t.number for t in _study(storage, "shared").trials]
    # Counted once over both workers: 3 trials, one more at most when both started their last at the same time.
    assert len(numbers) in (3, 4) and numbers == list(range(len(numbers)))
    folders = [set(_trial_folders(root)) for root in roots]
    assert folders[0].isdisjoint(folders[1]) and folders[0] | folders[1] == set(numbers)
    assert not (roots[0] / "tune.db").exists()  # the study lives in the shared storage
    # Re-running worker A continues the study: one trial more, the earlier trials kept as they are.
    earlier = {n: (roots[0] / "trials" / str(n) / "final").stat().st_mtime for n in folders[0]}
    rerun = _worker(config, roots[0], storage, len(numbers) + 1)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert [t.number for t in _study(storage, "shared").trials] == list(range(len(numbers) + 1))
    assert set(_trial_folders(roots[0])) == folders[0] | {len(numbers)}
    assert {n: (roots[0] / "trials" / str(n) / "final").stat().st_mtime for n in folders[0]} == earlier
    assert (roots[0] / "tune_report.md").read_text().count("| complete |") == len(numbers) + 1


def test_a_hopeless_trial_is_pruned_and_its_run_stopped(tmp_path, model_dirs, pc_file):
    import optuna

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(storage=storage, study_name="pruning", direction="minimize")
    # A finished trial whose eval loss was 0 at every step: any real run is worse than it from its first eval.
    study.add_trial(optuna.trial.create_trial(
        params={"distillation.alpha": 0.5}, distributions={"distillation.alpha": optuna.distributions.FloatDistribution(0.1, 0.9)},
        value=0.0, intermediate_values={step: 0.0 for step in range(1, 101)}))
    config = _tune_file(tmp_path, model_dirs, pc_file, space={"distillation.alpha": {"low": 0.1, "high": 0.9}},
                        budget={"max_steps": 40, "eval_steps": 2})
    root = tmp_path / "tune"
    assert main(["tune", "--config", str(config), "--output_dir", str(root), "--storage", storage, "--study", "pruning",
                 "--trials", "2"]) == 0
    trial = _study(storage, "pruning").trials[1]
    assert trial.state.name == "PRUNED" and trial.user_attrs["pruned_at"] == 2 and list(trial.intermediate_values) == [2]
    assert not (root / "trials" / "1" / "final").exists()  # stopped at its first eval, long before step 40
    assert "pruned at step 2" in (root / "tune_report.md").read_text()


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, model_dirs, pc_file, capsys):
    broken = tmp_path / "broken_student"  # its tokenizer loads, its weights are missing: the run fails
    broken.mkdir()
    for item in model_dirs["student"].iterdir():
        if "safetensors" not in item.name:
            shutil.copy2(item, broken / item.name)
    config = _tune_file(tmp_path, model_dirs, pc_file, space={"student_model": [str(broken)]}, trials=2)
    assert main(["tune", "--config", str(config)]) == 1  # no trial completed
    root = tmp_path / "out" / "tune"
    trials = _study(f"sqlite:///{root / 'tune.db'}", "run").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # the first failure did not stop the study
    for trial in trials:
        assert "broken_student" in trial.user_attrs["error"] and "\n" not in trial.user_attrs["error"]
    report = (root / "tune_report.md").read_text()
    assert report.count("| fail |") == 2 and "broken_student" in report and not (root / "best.yaml").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_a_failing_trial_does_not_stop_the_next_one_from_completing(tmp_path, model_dirs, pc_file):
    import optuna

    broken = tmp_path / "broken_student"  # its tokenizer loads, its weights are missing: the run fails
    broken.mkdir()
    for item in model_dirs["student"].iterdir():
        if "safetensors" not in item.name:
            shutil.copy2(item, broken / item.name)
    good = str(model_dirs["student"])
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(storage=storage, study_name="mixed", direction="minimize")
    study.enqueue_trial({"student_model": str(broken)})  # Optuna runs enqueued points first, in order
    study.enqueue_trial({"student_model": good})
    config = _tune_file(tmp_path, model_dirs, pc_file, space={"student_model": [str(broken), good]}, pruner="none")
    root = tmp_path / "tune"
    assert main(["tune", "--config", str(config), "--output_dir", str(root), "--storage", storage, "--study", "mixed",
                 "--trials", "2"]) == 0
    trials = _study(storage, "mixed").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "broken_student" in trials[0].user_attrs["error"] and "error" not in trials[1].user_attrs
    assert yaml.safe_load((root / "best.yaml").read_text())["student_model"] == good
    report = (root / "tune_report.md").read_text()
    assert report.count("| fail |") == 1 and report.count("| complete |") == 1
