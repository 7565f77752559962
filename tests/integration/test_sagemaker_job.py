"""Whole SageMaker training jobs: the real `train` entry point in a subprocess, over a fake /opt/ml tree."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nlm.models.loading import load_trained_model
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow


def make_job(root: Path, model_dirs: dict, hyperparameters: dict, rows: list, checkpoints: bool = False) -> Path:
    config = root / "input" / "config"
    config.mkdir(parents=True)
    # As the SageMaker SDK sends them: every value a JSON-encoded string.
    config.joinpath("hyperparameters.json").write_text(json.dumps({k: json.dumps(v) for k, v in hyperparameters.items()}))
    data = root / "input" / "data"
    for channel in ("train", "validation"):
        (data / channel).mkdir(parents=True)
        write_jsonl(data / channel / "part-0.jsonl", rows)
    shutil.copytree(model_dirs["teacher"], data / "teacher")
    shutil.copytree(model_dirs["student"], data / "student")
    if checkpoints:
        (root / "checkpoints").mkdir()
    return root


def run_job(root: Path, **variables: str) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "train"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "nlm.entrypoints.sagemaker_train"]
    env = {**os.environ, "NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **variables}
    return subprocess.run([*command, "train"], capture_output=True, text=True, timeout=300, env=env)


ROWS = [{"prompt": f"question: what is {i} plus {i}?", "completion": f"answer: {2 * i}"} for i in range(16)]
HPS = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.001,
       "distillation.divergence": "reverse_kl", "device_preference": ["cpu"], "logging_steps": 1}


def test_training_job_writes_a_servable_model(model_dirs, tmp_path):
    root = make_job(tmp_path / "opt_ml", model_dirs, {**HPS, "eval_strategy": "steps", "eval_steps": 2}, ROWS)
    result = run_job(root)
    assert result.returncode == 0, result.stderr[-3000:]
    model_dir = root / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not any(p.name.startswith("checkpoint-") for p in model_dir.iterdir())
    metadata = json.loads((model_dir / "training_metadata.json").read_text())
    assert metadata["global_step"] == 4 and metadata["config"]["distillation"]["divergence"] == "reverse_kl"
    assert metadata["data"]["eval_files"]  # the validation channel became the eval data
    metrics = json.loads((root / "output" / "data" / "metrics.json").read_text())
    assert "eval_loss" in metrics
    assert not (root / "output" / "failure").exists()
    model = load_trained_model(str(model_dir), device="cpu")  # what `nlm serve --model /opt/ml/model` loads
    assert model.config.num_hidden_layers == 2


def test_lora_job_publishes_the_merged_model(model_dirs, tmp_path):
    hps = {**HPS, "max_steps": 2, "lora.enabled": True, "lora.r": 4, "merge_lora": True}
    root = make_job(tmp_path / "opt_ml", model_dirs, hps, ROWS)
    result = run_job(root)
    assert result.returncode == 0, result.stderr[-3000:]
    model_dir = root / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "adapter" / "adapter_config.json").is_file()
    assert not (model_dir / "adapter_config.json").exists()  # servable without the student's base weights
    load_trained_model(str(model_dir), device="cpu")


def test_spot_restart_resumes_from_the_checkpoint_folder(model_dirs, tmp_path):
    root = make_job(tmp_path / "opt_ml", model_dirs, HPS, ROWS, checkpoints=True)
    assert run_job(root).returncode == 0
    run_dir = root / "checkpoints" / "distill"
    assert (run_dir / "checkpoint-2").is_dir()
    # The instance was reclaimed after checkpoint 2: SageMaker restores only what was synced until then.
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.rmtree(root / "model")
    result = run_job(root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoint-2'}" in result.stderr
    metadata = json.loads((root / "model" / "training_metadata.json").read_text())
    assert metadata["global_step"] == 4


def test_failed_job_leaves_a_one_line_reason(model_dirs, tmp_path):
    root = make_job(tmp_path / "opt_ml", model_dirs, HPS, ["not json at all", "{\"neither\": 1}"])
    result = run_job(root)
    assert result.returncode != 0
    reason = (root / "output" / "failure").read_text()
    assert reason.count("\n") == 1 and "part-0.jsonl" in reason, reason
    assert not (root / "model" / "model.safetensors").exists()


def test_a_job_never_publishes_another_jobs_work_folder(model_dirs, tmp_path):
    """Same host, same work folder: a later job with bad data fails (exit non-zero, `failure` written) instead
    of publishing the earlier job's model; one with other hyperparameters trains afresh instead of reusing."""
    root = make_job(tmp_path / "opt_ml", model_dirs, HPS, ROWS)
    assert run_job(root).returncode == 0
    work = root / "output" / "nlm-work" / "distill"
    assert (work / "run_fingerprint.json").is_file()

    bad = tmp_path / "bad_channel"
    bad.mkdir()
    (bad / "nope").write_text("not a JSONL file")
    result = run_job(root, SM_CHANNEL_TRAIN=str(bad), SM_MODEL_DIR=str(tmp_path / "model-2"))
    assert result.returncode != 0, result.stderr[-3000:]
    assert "already holds the finished model" not in result.stderr
    assert (root / "output" / "failure").read_text().strip()
    assert not (tmp_path / "model-2" / "model.safetensors").exists()

    (root / "output" / "failure").unlink()
    (root / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in {**HPS, "learning_rate": 0.0005}.items()}))
    result = run_job(root, SM_MODEL_DIR=str(tmp_path / "model-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was started by another job" in result.stderr and "already holds the finished model" not in result.stderr
    metadata = json.loads((tmp_path / "model-3" / "training_metadata.json").read_text())
    assert metadata["config"]["learning_rate"] == 0.0005 and metadata["global_step"] == 4, result.stderr[-6000:]

    result = run_job(root, SM_MODEL_DIR=str(tmp_path / "model-4"))  # the same job restarted: reused
    assert result.returncode == 0 and "already holds the finished model" in result.stderr, result.stderr[-3000:]


def test_the_work_folder_follows_sm_output_dir(model_dirs, tmp_path):
    from nlm.apps.sagemaker import read_job, run_folder

    root = make_job(tmp_path / "opt_ml", model_dirs, HPS, ROWS)
    job = read_job({"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0", "SM_OUTPUT_DIR": str(tmp_path / "out")})
    assert run_folder(job) == tmp_path / "out" / "nlm-work"
