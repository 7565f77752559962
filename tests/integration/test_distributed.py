"""Distribution is PyTorch's own: two CPU processes under torchrun (gloo) train one model together."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("extra", [[], ["--lora.enabled", "--lora.include_lm_head"], ["--loss_impl", "simple"],
                                   ["--distillation.lmbda", "1", "--distillation.max_new_tokens", "6"]])
def test_torchrun_two_processes(model_dirs, pc_file, tmp_path, extra):
    # `python -m torch.distributed.run` is torchrun run by this interpreter: a venv's `torchrun` script may
    # name another interpreter in its shebang (and so import another checkout's nlm).
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nlm.cli", "--log_level", "WARNING", "train",
               "--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
               "--train_file", str(pc_file), "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2",
               "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--device_preference", "cpu", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not extra:  # default log level: only the main process logs INFO and prints the result
        command.remove("--log_level")
        command.remove("WARNING")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("final model: ") == 1
    if not extra:
        assert result.stderr.count("INFO nlm.apps.train: precision: ") == 1, result.stderr[-4000:]
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


def _torchrun(args, tmp_path, timeout=420):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_two_processes_equal_one_process_with_the_same_global_batch(model_dirs, pc_file, tmp_path):
    """Same global batch (2 processes x 2 vs 1 x 4): same step-1 loss and grad norm, same eval figures over
    an eval set that does not split evenly (7 examples), same final weights."""
    import torch

    from nlm.apps.train import train
    from nlm.config.sources import load_config
    from tests.conftest import write_jsonl

    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"question: what is {i} plus 1?", "completion": f"answer: {i + 1}"}
                                                      for i in range(7)])
    common = ["--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
              "--train_file", str(pc_file), "--eval_file", str(eval_file), "--eval_strategy", "steps", "--eval_steps", "3",
              "--per_device_eval_batch_size", "2", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
              "--learning_rate", "1e-3", "--device_preference", "cpu", "--seed", "5"]
    two = _torchrun(["-m", "nlm.cli", "--log_level", "WARNING", "train", *common, "--output_dir", str(tmp_path / "two"),
                     "--per_device_train_batch_size", "2"], tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    one = train(load_config([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"]).config)
    histories = {}
    for name, final in (("two", tmp_path / "two" / "distill" / "final"), ("one", one.final_dir)):
        histories[name] = json.loads((final / "training_metadata.json").read_text())
    assert histories["two"]["world_size"] == 2 and histories["one"]["world_size"] == 1
    step1 = {name: next(e for e in h["log_history"] if e.get("step") == 1 and "loss" in e) for name, h in histories.items()}
    for key in ("loss", "grad_norm", "task_loss", "distill_loss"):  # the per-term logs cover every process too
        assert step1["two"][key] == pytest.approx(step1["one"][key], abs=1e-5), key
    for key in ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_teacher_kl", "eval_teacher_agreement"):
        assert histories["two"]["final_metrics"][key] == pytest.approx(histories["one"]["final_metrics"][key], abs=1e-5), key
    a = load_file(str(tmp_path / "two" / "distill" / "final" / "model.safetensors"))
    b = load_file(str(one.final_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


SKIP_ON_ONE_RANK = """
import sys
import torch.distributed as dist
import nlm.distill.engines.fused as trainer_module  # the fused engine calls it by module attribute
from nlm.cli import main

real = trainer_module.fused_distillation_loss
calls = {"n": 0}

def poisoned(*args, **kwargs):
    parts = real(*args, **kwargs)
    calls["n"] += 1
    if dist.get_rank() == 1 and calls["n"] == 2:  # one micro-batch, on one process only
        parts.total = parts.total * float("nan")
    return parts

trainer_module.fused_distillation_loss = poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_a_nan_on_one_process_is_skipped_by_all_without_hanging(model_dirs, pc_file, tmp_path):
    """Before: the poisoned process returned a loss without a graph, skipped DDP's all-reduce, and the other
    waited forever. Now both decide together, both skip, and the run finishes with finite weights."""
    import torch

    script = tmp_path / "poison.py"
    script.write_text(SKIP_ON_ONE_RANK)
    result = _torchrun([str(script), "train", "--teacher_model", str(model_dirs["teacher"]),
                        "--student_model", str(model_dirs["student"]), "--train_file", str(pc_file),
                        "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--per_device_train_batch_size", "2",
                        "--save_strategy", "no", "--device_preference", "cpu"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "non-finite loss at step 1" in result.stderr
    final = tmp_path / "out" / "distill" / "final"
    assert json.loads((final / "training_metadata.json").read_text())["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in load_file(str(final / "model.safetensors")).values())


def test_learned_parts_of_the_objective_train_the_same_on_two_processes(model_dirs, pc_file, tmp_path):
    """Hidden-state projections (student 32 wide, teacher 64) and a learned temperature are submodules of the
    student, so DDP averages their gradients too: 2 processes x 2 == 1 process x 4 for the student, the saved
    projections and the learned temperature."""
    import torch

    from nlm.apps.train import train
    from nlm.config.sources import load_config

    config = tmp_path / "objective.yaml"
    config.write_text("distillation:\n  temperature_mode: learned\n  hidden_states: {weight: 1.0, loss: mse, layers: auto}\n")
    common = ["--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
              "--train_file", str(pc_file), "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
              "--learning_rate", "1e-2", "--device_preference", "cpu", "--seed", "5"]
    two = _torchrun(["-m", "nlm.cli", "--log_level", "WARNING", "train", "--config", str(config), *common, "--output_dir",
                     str(tmp_path / "two"), "--per_device_train_batch_size", "2"], tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    one = train(load_config([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"], config).config)
    finals = {"two": tmp_path / "two" / "distill" / "final", "one": one.final_dir}
    meta = {name: json.loads((final / "training_metadata.json").read_text()) for name, final in finals.items()}
    step1 = {name: next(e for e in m["log_history"] if e.get("step") == 1 and "loss" in e) for name, m in meta.items()}
    for key in ("loss", "task_loss", "distill_loss", "hidden_states_loss"):
        assert step1["two"][key] == pytest.approx(step1["one"][key], abs=1e-5), key
    temperatures = {name: m["objective"]["learned_temperature"] for name, m in meta.items()}
    assert temperatures["two"] == pytest.approx(temperatures["one"], abs=1e-5) and temperatures["one"] != 2.0
    for file in ("model.safetensors", "distill_projections.safetensors"):
        a, b = load_file(str(finals["two"] / file)), load_file(str(finals["one"] / file))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=f"{file}: {key}")
