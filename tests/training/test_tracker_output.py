"""report_to: checked at config time (install command, W&B credentials); real trackers write real files."""

import importlib.util
import json

import pytest

from nlm.apps.train import train
from nlm.config.sources import load_config
from nlm.errors import ConfigError


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to.*unknown tracker 'tensorbord'"):
        load_config(["--report_to", "tensorbord"])


def test_missing_tracker_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tensorboard is not installed.*pip install tensorboard>=2\.15"):
        load_config(["--report_to", "tensorboard"])


def test_wandb_needs_credentials_or_offline_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="WANDB_MODE=offline"):
        load_config(["--report_to", "wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert load_config(["--report_to", "wandb"]).config.report_to == ["wandb"]


def test_config_error_comes_before_any_model_is_loaded(monkeypatch, model_dirs, pc_file, tmp_path):
    import nlm.models.loading as loading

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError):
        load_config(["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--report_to", "nope"])


def _train(model_dirs, pc_file, out, *extra):
    return train(load_config([
        "--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
        "--train_file", str(pc_file), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--max_steps", "4", "--logging_steps", "2", "--save_strategy", "no", *extra]).config)


@pytest.mark.slow
def test_tensorboard_and_mlflow_record_the_run(model_dirs, pc_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    result = _train(model_dirs, pc_file, tmp_path / "out", "--report_to", "tensorboard,mlflow")
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train/loss", "train/distill_loss", "train/task_loss", "train/sys_rss_mb"} <= set(accumulator.Tags()["scalars"])

    store = tmp_path / "out" / "mlflow.db"
    assert store.is_file(), "the default MLflow store is a local sqlite file"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 4]
    logged = [e for e in json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
    assert [m.value for m in history] == pytest.approx([e["loss"] for e in logged])


@pytest.mark.slow
def test_wandb_offline_writes_a_local_run(model_dirs, pc_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = _train(model_dirs, pc_file, tmp_path / "out", "--report_to", "wandb")
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
