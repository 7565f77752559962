"""Distribution is PyTorch's own: two CPU processes under torchrun (gloo) train one model together."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("extra", [[], ["--lora.enabled", "--lora.include_lm_head"], ["--loss_impl", "simple"],
                                   ["--distillation.lmbda", "1", "--distillation.max_new_tokens", "6"]])
def test_torchrun_two_processes(model_dirs, pc_file, tmp_path, extra):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / "out"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "nlm.cli", "--log_level", "WARNING", "train",
               "--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
               "--train_file", str(pc_file), "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2",
               "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--device_preference", "cpu", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    final = out / "distill" / "final"
    metadata = json.loads((final / "training_metadata.json").read_text())
    assert metadata["world_size"] == 2 and metadata["global_step"] == 3
    if "--lora.enabled" in extra:
        adapter = load_file(str(final / "adapter_model.safetensors"))
        assert any("lm_head" in key for key in adapter)
    else:
        weights = load_file(str(final / "model.safetensors"))
        before = load_file(str(model_dirs["student"] / "model.safetensors"))
        assert any(not (weights[k] == before[k]).all() for k in weights)
    assert (out / "distill" / "checkpoint-2").is_dir()
    if "--distillation.lmbda" in extra:  # each rank generated for its own shard, every step
        logged = [e for e in metadata["log_history"] if "loss" in e]
        assert logged and all(e["on_policy_share"] == 1.0 and e["generated_length"] > 0 for e in logged)
