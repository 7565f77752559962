"""Hardware figures: sampled where available, added to every training log record (JSON logs, trackers)."""

import json
from types import SimpleNamespace

import pytest
import torch

from nlm.training.callbacks import HardwareMetricsCallback
from nlm.training.hardware import HardwareSampler


def test_cpu_sampler_reads_process_memory_and_cpu_and_nothing_else():
    figures = HardwareSampler("cpu").sample()
    assert set(figures) == {"sys_rss_mb", "sys_cpu_percent"}
    assert figures["sys_rss_mb"] > 10 and figures["sys_cpu_percent"] >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_reads_allocator_figures():  # pragma: no cover - runs on GPU machines
    figures = HardwareSampler("cuda").sample()
    assert {"gpu_mem_allocated_mb", "gpu_mem_reserved_mb", "gpu_mem_peak_mb"} <= set(figures)


def test_callback_adds_figures_to_training_logs_and_history_only():
    callback = HardwareMetricsCallback()
    args = SimpleNamespace(device=torch.device("cpu"))
    state = SimpleNamespace(global_step=3, log_history=[{"loss": 1.0, "step": 3}])
    callback.on_train_begin(args, state, None)
    logs = {"loss": 1.0}
    callback.on_log(args, state, None, logs=logs)
    assert "sys_rss_mb" in logs and "sys_rss_mb" in state.log_history[-1]
    eval_logs = {"eval_loss": 1.0}
    callback.on_log(args, state, None, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}


@pytest.mark.slow
def test_json_logs_and_metadata_carry_hardware_figures(model_dirs, pc_file, tmp_path, capfd):
    from nlm.apps.train import train
    from nlm.config.logging_setup import setup_logging
    from nlm.config.sources import load_config

    setup_logging("INFO", "json")
    result = train(load_config([
        "--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
        "--train_file", str(pc_file), "--output_dir", str(tmp_path), "--per_device_train_batch_size", "4",
        "--max_steps", "4", "--logging_steps", "2", "--save_strategy", "no"]).config, log_format="json")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    steps = [line for line in lines if "loss" in line and "step" in line]
    assert steps and all(line["sys_rss_mb"] > 0 and "sys_cpu_percent" in line for line in steps)
    history = json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"]
    assert all("sys_rss_mb" in entry for entry in history if "loss" in entry)

    from nlm.apps.run_report import write_report  # the report reads the same history: memory gets a panel

    report = write_report([result.run_dir])
    assert report["png"] and report["rows"][0]["peak_rss_mb"] > 0
