"""The teacher cache for a teacher with another tokenizer (cross_tokenizer: alm): training from it equals
training with the live teacher; it records both tokenizers; the methods it cannot serve are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nlm.apps.teacher_cache import build_teacher_cache
from nlm.apps.train import train
from nlm.config.sources import load_config
from nlm.errors import ConfigError
from nlm.models.scratch import build_causal_lm, build_tokenizer
from tests.conftest import CORPUS


def _config(model_dirs, data, out, *extra, student=None):
    return load_config([
        "--student_model", str(student or model_dirs["student"]), "--train_file", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-2",
        "--save_strategy", "no", "--seed", "3", "--distillation.cross_tokenizer", "alm", "--distillation.alpha", "0.8", *extra,
    ]).config


@pytest.mark.slow
def test_training_from_an_alm_cache_equals_training_with_the_live_teacher(other_teacher, model_dirs, pc_file, tmp_path):
    cache = tmp_path / "cache"
    manifest = build_teacher_cache(_config(model_dirs, pc_file, tmp_path / "x", "--teacher_model", str(other_teacher)), cache,
                                   batch_size=3, shard_examples=10)  # several shards, batches across shard ends
    assert manifest["kind"] == "cross_alm" and manifest["complete"] and len(manifest["shards"]) == 3
    assert manifest["bytes_per_token"] == 4 and manifest["tokens"] > 24
    assert manifest["fingerprint"]["student_tokenizer"] != manifest["fingerprint"]["tokenizer"]
    assert (cache / "teacher_tokenizer" / "tokenizer.json").is_file()

    live = train(_config(model_dirs, pc_file, tmp_path / "live", "--teacher_model", str(other_teacher)))
    cached = train(_config(model_dirs, pc_file, tmp_path / "cached", "--teacher_cache", str(cache)))
    histories = {name: json.loads((r.final_dir / "training_metadata.json").read_text()) for name, r in
                 (("live", live), ("cached", cached))}
    assert histories["cached"]["teacher"]["describe"]["kind"] == "cache_cross_tokenizer"
    for step in (1, 2, 3):
        found = {name: next(e for e in h["log_history"] if e.get("step") == step and "loss" in e) for name, h in histories.items()}
        assert found["cached"]["loss"] == pytest.approx(found["live"]["loss"], abs=1e-5)
        assert found["cached"]["distill_loss"] == pytest.approx(found["live"]["distill_loss"], abs=1e-5)
        assert found["live"]["distill_loss"] > 0
    a, b = load_file(str(live.final_dir / "model.safetensors")), load_file(str(cached.final_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_an_alm_cache_refuses_another_student_tokenizer_and_other_methods(other_teacher, model_dirs, pc_file, tmp_path):
    cache = tmp_path / "cache"
    build_teacher_cache(_config(model_dirs, pc_file, tmp_path / "x", "--teacher_model", str(other_teacher)), cache)
    stranger = tmp_path / "stranger"  # a student whose tokenizer is neither the teacher's nor the cache's student's
    tokenizer = build_tokenizer(CORPUS, vocab_size=260)
    build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, seed=1).save_pretrained(stranger)
    tokenizer.save_pretrained(stranger)
    with pytest.raises(ConfigError, match="'student_tokenizer'"):
        train(_config(model_dirs, pc_file, tmp_path / "a", "--teacher_cache", str(cache), student=stranger))
    with pytest.raises(ConfigError, match="cross_tokenizer=hybrid cannot use a teacher cache"):
        build_teacher_cache(_config(model_dirs, pc_file, tmp_path / "b", "--teacher_model", str(other_teacher),
                                    "--distillation.cross_tokenizer", "hybrid"), tmp_path / "other")
