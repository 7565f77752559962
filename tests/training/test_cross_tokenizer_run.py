"""`nlm train` with a teacher whose tokenizer differs: refused without a method, trained with uld/hybrid."""

from __future__ import annotations

import json

import pytest

from nlm.apps.train import train
from nlm.config.sources import load_config
from nlm.errors import VocabularyMismatchError
from nlm.models.scratch import build_causal_lm, build_tokenizer
from tests.conftest import CORPUS


def _config(teacher, model_dirs, data, out, *extra):
    return load_config([
        "--teacher_model", str(teacher), "--student_model", str(model_dirs["student"]), "--train_file", str(data),
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1",
        "--learning_rate", "1e-3", *extra,
    ]).config


@pytest.mark.slow
def test_a_teacher_with_a_smaller_vocabulary_than_the_student(model_dirs, pc_file, tmp_path):
    """Each model is only ever fed its own token ids (a student id past the teacher's vocabulary would crash)."""
    folder = tmp_path / "small_teacher"
    tokenizer = build_tokenizer(CORPUS, vocab_size=120)
    build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = train(_config(folder, model_dirs, pc_file, tmp_path / "out", "--distillation.cross_tokenizer", "uld",
                           "--max_steps", "2"))
    assert (result.final_dir / "training_metadata.json").is_file()


def test_different_tokenizers_are_refused_naming_the_option(other_teacher, model_dirs, pc_file, tmp_path):
    with pytest.raises(VocabularyMismatchError, match="distillation.cross_tokenizer to uld, hybrid or alm") as info:
        train(_config(other_teacher, model_dirs, pc_file, tmp_path / "out"))
    assert info.value.exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uld", "hybrid", "alm"])
def test_cross_tokenizer_training_runs_and_records_the_method(other_teacher, model_dirs, pc_file, tmp_path, method):
    result = train(_config(other_teacher, model_dirs, pc_file, tmp_path / "out", "--distillation.cross_tokenizer", method))
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    assert metadata["config"]["distillation"]["cross_tokenizer"] == method
    assert metadata["teacher"]["describe"]["method"] == method
    logged = [entry for entry in metadata["log_history"] if "distill_loss" in entry]
    assert logged and all(entry["distill_loss"] > 0 for entry in logged)


def test_same_tokenizer_ignores_the_option(model_dirs, pc_file, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="nlm")
    config = _config(model_dirs["teacher"], model_dirs, pc_file, tmp_path / "out", "--distillation.cross_tokenizer", "hybrid",
                     "--max_steps", "1")
    result = train(config)
    assert "cross_tokenizer=hybrid ignored" in caplog.text
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    assert metadata["teacher"]["describe"] is None or metadata["teacher"]["describe"].get("kind") != "live_cross_tokenizer"


def test_teacher_cache_with_cross_tokenizer_is_a_usage_error(model_dirs, pc_file, tmp_path):
    from nlm.errors import ConfigError

    config = _config(model_dirs["teacher"], model_dirs, pc_file, tmp_path / "out", "--distillation.cross_tokenizer", "uld")
    config = config.model_copy(update={"teacher_cache": tmp_path, "teacher_model": None})
    with pytest.raises(ConfigError, match="cross_tokenizer=uld cannot use a teacher cache.*use cross_tokenizer=alm"):
        train(config)


def test_eval_against_a_teacher_with_another_tokenizer_reports_per_byte_figures(other_teacher, model_dirs, pc_file):
    from nlm.apps.evaluate import evaluate_model
    from nlm.data.tokenize import TokenizeSettings

    result = evaluate_model(model_dirs["student"], pc_file, teacher_path=other_teacher, batch_size=8,
                            settings=TokenizeSettings(max_seq_length=64), device="cpu")
    for key in ("loss", "perplexity", "bits_per_byte", "teacher_bits_per_byte", "teacher_aligned_uld", "aligned_groups"):
        assert key in result, key
    assert result["aligned_groups"] > 0 and result["target_bytes"] > 0
    assert 0 < result["teacher_aligned_uld"] <= 2
    # the student's bits per byte is its own token NLL re-expressed per byte of the same text
    import math
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / result["target_bytes"] / math.log(2), rel=1e-6)


def test_eval_with_itself_as_teacher_has_equal_bits_per_byte_and_zero_divergence(model_dirs, pc_file, monkeypatch):
    """Force the cross path with identical tokenizers: both sides score the same text identically."""
    from nlm.apps import evaluate as evaluate_module
    from nlm.data.tokenize import TokenizeSettings

    monkeypatch.setattr(evaluate_module, "tokenizers_equal", lambda a, b: False)
    result = evaluate_module.evaluate_model(model_dirs["student"], pc_file, teacher_path=model_dirs["student"], batch_size=8,
                                            settings=TokenizeSettings(max_seq_length=64), device="cpu")
    assert result["teacher_bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-5)
    assert result["teacher_aligned_uld"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_cross_tokenizer_with_lora_trains_only_the_adapter(other_teacher, model_dirs, pc_file, tmp_path):
    from safetensors.torch import load_file

    result = train(_config(other_teacher, model_dirs, pc_file, tmp_path / "out", "--distillation.cross_tokenizer", "uld",
                           "--lora.enabled", "--lora.r", "4"))
    adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert adapter and all("lora" in name for name in adapter)
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # B starts at zero


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hybrid", "alm"])
def test_cross_tokenizer_two_processes_equal_one_process(other_teacher, model_dirs, pc_file, tmp_path, method):
    """torchrun, 2 processes × 2 examples == 1 process × 4: step-1 loss, grad norm and final weights."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    common = ["--teacher_model", str(other_teacher), "--student_model", str(model_dirs["student"]), "--train_file",
              str(pc_file), "--max_steps", "2", "--save_strategy", "no", "--logging_steps", "1", "--learning_rate", "1e-3",
              "--device_preference", "cpu", "--seed", "4", "--distillation.cross_tokenizer", method]
    # `python -m torch.distributed.run`: this interpreter's torchrun (a venv script's shebang may name another)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nlm.cli",
               "--log_level", "WARNING", "train", *common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    one = train(load_config([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"]).config)
    finals = {"two": tmp_path / "two" / "distill" / "final", "one": one.final_dir}
    meta = {name: json.loads((final / "training_metadata.json").read_text()) for name, final in finals.items()}
    assert meta["two"]["world_size"] == 2 and meta["two"]["teacher"]["describe"]["method"] == method
    step1 = {name: next(e for e in m["log_history"] if e.get("step") == 1 and "loss" in e) for name, m in meta.items()}
    for key in ("loss", "grad_norm", "distill_loss"):
        assert step1["two"][key] == pytest.approx(step1["one"][key], abs=1e-5), key
    a, b = load_file(str(finals["two"] / "model.safetensors")), load_file(str(finals["one"] / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_cross_tokenizer_with_a_mixture_logs_each_sources_loss(other_teacher, model_dirs, tmp_path):
    """log_per_source on the cross-tokenizer path (it failed with a NameError before)."""
    from tests.conftest import write_jsonl

    math = write_jsonl(tmp_path / "math.jsonl", [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(12)])
    talk = write_jsonl(tmp_path / "talk.jsonl", [{"prompt": "say hello", "completion": f" hello world {i}"} for i in range(12)])
    config = tmp_path / "mix.yaml"
    config.write_text(f"train_mixture:\n  - {{path: {math}, weight: 1, name: math}}\n  - {{path: {talk}, weight: 1, name: talk}}\n"
                      "log_per_source: true\ndistillation: {cross_tokenizer: alm}\n")
    result = train(load_config(["--teacher_model", str(other_teacher), "--student_model", str(model_dirs["student"]),
                                "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--max_steps", "3",
                                "--logging_steps", "1", "--save_strategy", "no"], config).config)
    logged = [e for e in json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
    assert logged and all(any(k.startswith("task_loss/") and v > 0 for k, v in e.items()) for e in logged)
    assert {"task_loss/math", "task_loss/talk"} <= {k for e in logged for k in e}


@pytest.mark.slow
def test_cross_tokenizer_under_fsdp_is_refused_before_training(other_teacher, model_dirs, pc_file, tmp_path, monkeypatch):
    """FSDP and ZeRO-3 need a GPU launcher; here the Trainer is told it runs under FSDP, as accelerate would."""
    from transformers import Trainer

    from nlm.errors import ConfigError

    real = Trainer.create_accelerator_and_postprocess

    def as_if_fsdp(self):
        real(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_if_fsdp)
    with pytest.raises(ConfigError, match="cross_tokenizer does not work with sharded parameters .* use DDP") as info:
        train(_config(other_teacher, model_dirs, pc_file, tmp_path / "out", "--distillation.cross_tokenizer", "alm"))
    assert info.value.exit_code == 2
    assert not (tmp_path / "out" / "distill" / "final").exists()


def test_nlm_eval_prints_the_per_byte_figures_against_another_tokenizer(other_teacher, model_dirs, pc_file, capsys):
    """`nlm eval --teacher` printed only a fixed list of keys, so the cross-tokenizer figures never showed."""
    from nlm.cli import main

    assert main(["eval", "--model", str(model_dirs["student"]), "--data", str(pc_file), "--teacher", str(other_teacher)]) == 0
    printed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()}
    for key in ("loss", "bits_per_byte", "teacher_bits_per_byte", "teacher_aligned_uld", "aligned_groups", "tokens"):
        assert key in printed, key
    assert float(printed["teacher_bits_per_byte"]) > 0
