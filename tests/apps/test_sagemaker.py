"""The SageMaker training contract, read from a fake /opt/ml tree (no training here; see
tests/integration/test_sagemaker_job.py for whole jobs)."""

import json
from pathlib import Path

import pytest

from nlm.apps.sagemaker import (
    channel_environment,
    decode_hyperparameters,
    read_job,
    training_arguments,
    validate,
)
from nlm.entrypoints import sagemaker_train as entrypoint
from nlm.errors import ConfigError
from nlm.training.launch import Topology, error_line, train_command


def fake_opt_ml(root: Path, hyperparameters: dict, channels=("train",)) -> Path:
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    for name in channels:
        folder = root / "input" / "data" / name
        folder.mkdir(parents=True)
        (folder / "part.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return root


def test_sdk_encoded_values_are_decoded_and_dotted_names_nested():
    raw = {"distillation.divergence": '"reverse_kl"', "learning_rate": "0.001", "lora.enabled": "true",
           "lora.r": "8", "report_to": '["tensorboard"]', "run_name": "plain-text", "sagemaker_region": '"us-east-1"'}
    assert decode_hyperparameters(raw) == {
        "distillation": {"divergence": "reverse_kl"}, "learning_rate": 0.001, "lora": {"enabled": True, "r": 8},
        "report_to": ["tensorboard"], "run_name": "plain-text",
    }


def test_a_name_both_plain_and_nested_is_rejected():
    with pytest.raises(ConfigError, match="lora.r"):
        decode_hyperparameters({"lora": "1", "lora.r": "8"})


def test_job_from_the_tree_and_from_variables(tmp_path):
    root = fake_opt_ml(tmp_path, {"max_steps": "3"}, channels=("train", "validation", "teacher"))
    job = read_job({"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0"})
    assert job.hyperparameters == {"max_steps": 3}
    assert set(job.channels) == {"train", "validation", "teacher"}
    assert job.model_dir == root / "model" and job.output_data_dir == root / "output" / "data"
    assert job.failure_file == root / "output" / "failure" and job.checkpoint_dir is None
    (root / "checkpoints").mkdir()
    env = {"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "4", "SM_HPS": json.dumps({"lora.r": 4}),
           "SM_MODEL_DIR": str(tmp_path / "m"), "SM_CHANNEL_EXTRA": str(tmp_path), "SM_HOSTS": '["algo-1", "algo-2"]',
           "SM_CURRENT_HOST": "algo-2"}
    job = read_job(env)
    assert job.hyperparameters == {"lora": {"r": 4}} and job.num_gpus == 4 and job.model_dir == tmp_path / "m"
    assert job.channels["extra"] == tmp_path and job.checkpoint_dir == root / "checkpoints" and job.node_rank == 1
    assert channel_environment(job)["SM_CHANNEL_VALIDATION"] == str(root / "input" / "data" / "validation")


def test_arguments_channels_and_resume(tmp_path):
    root = fake_opt_ml(tmp_path, {"lora.r": "8", "output_dir": '"/elsewhere"', "student_model": '"s"'},
                       channels=("train", "teacher", "student"))
    (root / "checkpoints" / "distill" / "checkpoint-2").mkdir(parents=True)
    job = read_job({"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0"})
    args, config_file = training_arguments(job)
    assert config_file is None
    assert "--lora.r=8" in args and "--student_model=s" in args  # a hyperparameter beats the channel
    assert f"--teacher_model={root / 'input' / 'data' / 'teacher'}" in args
    assert f"--output_dir={root / 'checkpoints'}" in args and "--resume=true" in args
    assert not any(a.startswith("--output_dir=/elsewhere") for a in args)


def test_validation_names_the_hyperparameter(tmp_path):
    root = fake_opt_ml(tmp_path, {"lora.r": "0", "student_model": '"s"', "teacher_model": '"t"'})
    job = read_job({"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0"})
    args, config_file = training_arguments(job)
    with pytest.raises(ConfigError, match=r"lora.r = '0' \(from hyperparameter lora.r\)"):
        validate(args, config_file, channel_environment(job))
    job.hyperparameters = {"lora": {"rank": 4}}
    with pytest.raises(ConfigError, match="unknown hyperparameter lora.rank"):
        validate(*training_arguments(job), channel_environment(job))


def test_secrets_are_refused_as_hyperparameters(tmp_path):
    root = fake_opt_ml(tmp_path, {"hf_token": '"hf_abc"'})
    with pytest.raises(ConfigError, match="NLM_HF_TOKEN"):
        training_arguments(read_job({"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0"}))


def test_config_channel_supplies_the_yaml(tmp_path):
    root = fake_opt_ml(tmp_path, {}, channels=("train", "config"))
    (root / "input" / "data" / "config" / "run.yaml").write_text("max_steps: 2\n")
    args, config_file = training_arguments(read_job({"NLM_SAGEMAKER_ROOT": str(root), "SM_NUM_GPUS": "0"}))
    assert config_file == root / "input" / "data" / "config" / "run.yaml"


def test_one_process_per_gpu_through_torchrun():
    assert train_command(["--x=1"])[1:] == ["-m", "nlm.cli", "train", "--x=1"]
    command = train_command(["--x=1"], Topology(nproc_per_node=8))
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "8"] and "--standalone" in command
    command = train_command([], Topology(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="algo-1"))
    assert ["--nnodes", "2", "--node_rank", "1", "--master_addr", "algo-1"] == command[5:11]


def test_error_line_prefers_the_child_own_message():
    assert error_line(["noise", "[rank0]: nlm: error: no training data", "torchrun traceback"], 1) == "error: no training data"
    assert error_line(["Killed"], 137) == "training exited with code 137: Killed"


def test_entry_point_writes_the_failure_reason(tmp_path, monkeypatch, capsys):
    root = fake_opt_ml(tmp_path, {"lora.r": "0", "student_model": '"s"', "teacher_model": '"t"'})
    monkeypatch.setenv("NLM_SAGEMAKER_ROOT", str(root))
    monkeypatch.setenv("SM_NUM_GPUS", "0")
    assert entrypoint.main(["train"]) == 2
    failure = (root / "output" / "failure").read_text()
    assert failure.count("\n") == 1 and "lora.r" in failure and "hyperparameter" in failure
    assert "Traceback" not in capsys.readouterr().err
