"""nlm publish against a real sqlite MLflow store: lineage, alias rules, and models:/NAME@ALIAS round trip."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nlm.apps.publish import download_registered_model, publish_model
from nlm.commands.publish import Options, run
from nlm.errors import ConfigError
from nlm.models.loading import load_tokenizer, load_trained_model


def _final(tmp_path, model_dirs, name, eval_loss):
    """A final/ folder as nlm train writes it (weights, tokenizer, training_metadata.json)."""
    final = tmp_path / name / "final"
    shutil.copytree(model_dirs["student"], final)
    (final / "training_metadata.json").write_text(json.dumps({
        "config": {"run_name": name, "learning_rate": 1e-3, "hf_token": "**********",
                   "distillation": {"alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl"}, "lora": {"enabled": False}},
        "teacher": {"model": "org/teacher", "revision": "t-rev"}, "student": {"model": "org/student", "revision": None},
        "data": {"train_files": {"/data/train.jsonl": "ab" * 32}},
        "git_commit": "deadbeef", "versions": {"nlm": "0.1.0"}, "global_step": 6, "loss_impl": "fused",
        "final_metrics": {"eval_loss": eval_loss, "eval_token_accuracy": 0.5, "train_runtime": 1.0},
    }))
    return final


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds); each test uses its own names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'registry.db'}"


@pytest.mark.slow
def test_publish_records_lineage_and_moves_the_alias_only_on_improvement(tmp_path, model_dirs, store):
    from mlflow import MlflowClient

    first = publish_model(_final(tmp_path, model_dirs, "a", 1.0).parent, "student", tracking_uri=store,
                          alias="champion", only_if_better="eval_loss")
    assert first.version == "1" and first.alias_moved
    worse = publish_model(_final(tmp_path, model_dirs, "b", 1.5), "student", tracking_uri=store,
                          alias="champion", only_if_better="eval_loss")
    assert worse.version == "2" and not worse.alias_moved and "kept" in worse.reason
    better = publish_model(_final(tmp_path, model_dirs, "c", 0.8), "student", tracking_uri=store,
                           alias="champion", only_if_better="eval_loss")
    assert better.alias_moved

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert str(client.get_model_version_by_alias("student", "champion").version) == "3"
    version = client.get_model_version("student", "2")
    assert version.tags["nlm.git_commit"] == "deadbeef" and version.tags["metric.eval_loss"] == "1.5"
    assert json.loads(version.tags["nlm.train_files"]) == {"/data/train.jsonl": "ab" * 32}
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.params["teacher"] == "org/teacher" and mlflow_run.data.params["alpha"] == "0.5"
    assert mlflow_run.data.metrics["eval_loss"] == 1.5
    assert "**********" not in json.dumps(mlflow_run.data.params) + json.dumps(version.tags)
    assert Path(store.removeprefix("sqlite:///")).with_name("registry-artifacts").is_dir()  # not in the cwd


@pytest.mark.slow  # one of the fast suite's slowest (MLflow registry round trip)
def test_higher_is_better_for_accuracy_metrics(tmp_path, model_dirs, store):
    publish_model(_final(tmp_path, model_dirs, "a", 1.0), "acc", tracking_uri=store, alias="best")
    result = publish_model(_final(tmp_path, model_dirs, "b", 0.1), "acc", tracking_uri=store, alias="best",
                           only_if_better="eval_token_accuracy")  # equal accuracy: not an improvement
    assert not result.alias_moved


@pytest.mark.slow  # one of the fast suite's slowest (MLflow registry round trip)
def test_registered_model_loads_back_with_identical_outputs(tmp_path, model_dirs, store, tokenizer):
    final = _final(tmp_path, model_dirs, "a", 1.0)
    run(Options(model=str(final), name="roundtrip", tracking_uri=store, alias="champion"))
    folder = download_registered_model("models:/roundtrip@champion", store, tmp_path / "download")
    ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = load_trained_model(final)(ids).logits
        got = load_trained_model(folder)(ids).logits
    assert torch.equal(expected, got)
    assert load_tokenizer(str(folder))("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_bad_requests_are_config_errors(tmp_path, model_dirs, store, monkeypatch):
    final = _final(tmp_path, model_dirs, "a", 1.0)
    with pytest.raises(ConfigError, match="--only_if_better eval_bleu: not among this model's metrics: eval_loss"):
        publish_model(final, "m", tracking_uri=store, alias="x", only_if_better="eval_bleu")
    with pytest.raises(ConfigError, match="needs --alias"):
        publish_model(final, "m", tracking_uri=store, only_if_better="eval_loss")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="--tracking_uri is required"):
        publish_model(final, "m")
    with pytest.raises(ConfigError, match="folder not found"):
        publish_model(tmp_path / "nope", "m", tracking_uri=store)


def test_nlm_publish_on_the_command_line(tmp_path, model_dirs, store, capsys):
    from nlm.cli import main

    final = _final(tmp_path, model_dirs, "a", 1.0)
    assert main(["publish", "--model", str(final), "--name", "cli", "--tracking_uri", store, "--alias", "champion"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["version"] == "1" and printed["alias_moved"]
    assert main(["publish", "--model", str(final), "--name", "cli", "--tracking_uri", store,
                 "--only_if_better", "eval_loss"]) == 2
