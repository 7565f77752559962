"""The `tune:` section: every space key is a training option with in-range bounds, checked before any trial."""

import pytest
import yaml

from nlm.cli import main
from nlm.errors import ConfigError
from nlm.tune.spec import load_tune


def _write(tmp_path, pc_file, tune, **run):
    document = {"student_model": "student", "teacher_model": "teacher", "train_file": str(pc_file), "eval_split": 0.25,
                "output_dir": str(tmp_path / "out"), **run, "tune": tune}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("space, message", [
    ({"distillation.alpah": {"low": 0.1, "high": 0.9}}, "tune.space.distillation.alpah: not a training option "
                                                         "(did you mean 'distillation.alpha'?)"),
    ({"distillation.alpha": {"low": 0.1, "high": 1.5}}, "tune.space.distillation.alpha = 1.5: distillation.alpha: "
                                                         "Input should be less than or equal to 1"),
    ({"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, "tune.space.learning_rate: log: true needs low > 0"),
    ({"distillation.alpha": {"low": 0.9, "high": 0.1}}, "low (0.9) must be below high (0.1)"),
    ({"distillation.divergence": ["forward_kl", "backward_kl"]}, "tune.space.distillation.divergence = 'backward_kl'"),
    ({"distillation.divergence": {"low": 1, "high": 2}}, "a range needs a numeric option"),
    ({"max_seq_length": {"low": 16, "high": 64.5}}, "an integer option needs integer low, high and step"),
    ({"output_dir": ["a", "b"]}, "tune.space.output_dir: cannot be searched"),
    ({"learning_rate": 0.1}, "expected {low: .., high: ..} or a list of choices"),
    ({}, "tune.space: Dictionary should have at least 1 item"),
])
def test_a_bad_space_is_one_config_error_naming_the_key(tmp_path, pc_file, space, message):
    with pytest.raises(ConfigError) as caught:
        load_tune(_write(tmp_path, pc_file, {"space": space}))
    assert message in str(caught.value) and str(tmp_path / "run.yaml") in str(caught.value)


@pytest.mark.parametrize("tune, run, message", [
    ({"metric": "exact_match"}, {}, "tune.metric = 'exact_match': expected one of eval_loss"),
    ({"budget": {"max_stpes": 10}}, {}, "unknown key 'max_stpes'"),
    ({"budget": {"output_dir": "/tmp/x"}}, {}, "tune.budget.output_dir: cannot be set per trial"),
    ({}, {"eval_split": 0.0}, "tune needs eval data for eval_loss"),
    ({"metric": "teacher_kl"}, {"teacher_model": None}, "needs a teacher"),
    ({"trails": 3}, {}, "tune.trails: Extra inputs are not permitted"),
])
def test_bad_tune_settings_are_config_errors(tmp_path, pc_file, tune, run, message):
    path = _write(tmp_path, pc_file, {"space": {"distillation.alpha": {"low": 0.1, "high": 0.9}}, **tune}, **run)
    with pytest.raises(ConfigError, match=None) as caught:
        load_tune(path)
    assert message in str(caught.value)


def test_no_tune_section_and_the_command_line_exit_2(tmp_path, pc_file, capsys):
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"train_file": str(pc_file)}))
    assert main(["tune", "--config", str(plain)]) == 2
    assert "no `tune:` section" in capsys.readouterr().err
    bad = _write(tmp_path, pc_file, {"space": {"distilation.alpha": [0.1]}})
    assert main(["tune", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tune.space.distilation.alpha: not a training option" in err
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_dimensions_sample_the_option_type_and_documents_merge(tmp_path, pc_file):
    import optuna

    space = {"distillation.alpha": {"low": 0.1, "high": 0.9}, "max_seq_length": {"low": 16, "high": 64, "step": 16},
             "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "distillation.divergence": ["jsd", "tvd"]}
    setup = load_tune(_write(tmp_path, pc_file, {"space": space, "budget": {"max_steps": 5}},
                             distillation={"temperature": 3.0}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = {d.key: d.suggest(trial) for d in setup.dimensions}
    assert isinstance(params["max_seq_length"], int) and params["max_seq_length"] in (16, 32, 48, 64)
    assert 0.1 <= params["distillation.alpha"] <= 0.9 and params["distillation.divergence"] in ("jsd", "tvd")
    assert trial.distributions["learning_rate"].log
    document = setup.trial_document(params, tmp_path / "trials", 7)
    assert document["distillation"] == {"temperature": 3.0, "alpha": params["distillation.alpha"],
                                        "divergence": params["distillation.divergence"]}
    assert (document["max_steps"], document["run_name"], document["eval_strategy"], document["save_strategy"]) == (
        5, "7", "steps", "no")
    best = setup.best_document(params)
    assert "max_steps" not in best and "tune" not in best and best["output_dir"] == str(tmp_path / "out")
    assert setup.spec.resolved_direction == "minimize"


def test_the_keys_table_in_docs_is_current():
    from pathlib import Path

    from nlm.tune.spec import render_keys

    text = (Path(__file__).resolve().parents[2] / "docs" / "TUNE.md").read_text()
    table = text.split("<!-- tune-keys -->\n")[1].split("<!-- /tune-keys -->")[0]
    assert table == render_keys(), "paste nlm.tune.spec.render_keys() between the tune-keys markers of docs/TUNE.md"
