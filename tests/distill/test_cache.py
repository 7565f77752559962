"""Teacher cache: build, resume, fingerprint checks, and training from it without the teacher."""

import json

import pytest
import torch

from nlm.cli import main
from nlm.config.sources import load_config
from nlm.distill.cache import TeacherCache, bytes_per_token
from nlm.errors import ConfigError
from nlm.training.run import train


def _build(model_dirs, data, out, *extra):
    return main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--train_file", str(data), "--output", str(out),
                 "--top_k", "16", "--shard_examples", "10", *extra])


def test_build_read_and_compact_size(model_dirs, pc_file, tmp_path, tokenizer, capsys):
    assert _build(model_dirs, pc_file, tmp_path / "cache") == 0
    assert "bytes per token" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["examples"] == 24 and len(manifest["shards"]) == 3
    assert manifest["bytes_per_token"] == bytes_per_token(16, len(tokenizer)) <= 6 * 16 + 8
    for key in ("tokenizer", "chat_template", "temperature", "max_seq_length", "data_files", "top_k", "nlm_version", "teacher_model"):
        assert key in manifest["fingerprint"], key
    assert manifest["teacher_weights"].startswith("sha256:")

    cache = TeacherCache(tmp_path / "cache")
    targets = cache.targets([0, 23, 5])
    assert targets.ids.shape[1] == 16 and targets.ids.shape[0] == targets.logp.shape[0] == targets.tail_logp.shape[0]
    probs = targets.logp.exp().sum(-1) + targets.tail_logp.exp()
    torch.testing.assert_close(probs, torch.ones_like(probs), rtol=0, atol=5e-3)
    assert (targets.logp[:, :-1] >= targets.logp[:, 1:]).all()  # top-k sorted


def test_cached_values_equal_the_live_teacher(model_dirs, pc_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from nlm.data.tokenize import TokenizeSettings, tokenize_records
    from nlm.models.loading import load_tokenizer

    assert _build(model_dirs, pc_file, tmp_path / "cache") == 0
    tokenizer = load_tokenizer(str(model_dirs["teacher"]))
    example = tokenize_records([pc_file], tokenizer, TokenizeSettings()).dataset[3]
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"]).eval()
    with torch.no_grad():
        logits = teacher(torch.tensor([example["input_ids"]])).logits[0, :-1]
    mask = torch.tensor(example["labels"][1:]) != -100
    expected = torch.log_softmax(logits[mask] / 2.0, -1).topk(16, dim=-1)
    cached = TeacherCache(tmp_path / "cache").targets([3])
    assert torch.equal(cached.ids, expected.indices)
    torch.testing.assert_close(cached.logp, expected.values, rtol=0, atol=2e-3)  # float16 storage


def test_interrupted_build_resumes(model_dirs, pc_file, tmp_path, monkeypatch):
    import nlm.distill.cache_builder as builder

    real = builder.save_shard
    calls = {"n": 0}

    def crash_on_second(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, rows)

    monkeypatch.setattr(builder, "save_shard", crash_on_second)
    assert _build(model_dirs, pc_file, tmp_path / "cache") == 130  # interrupted
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    monkeypatch.setattr(builder, "save_shard", real)
    assert _build(model_dirs, pc_file, tmp_path / "cache") == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and [s["first_example"] for s in manifest["shards"]] == [0, 10, 20]


def test_training_from_the_cache_needs_no_teacher_and_checks_fingerprints(model_dirs, pc_file, tmp_path, monkeypatch):
    assert _build(model_dirs, pc_file, tmp_path / "cache") == 0
    import nlm.training.run as run_module

    loaded = []
    real_load = run_module.load_causal_lm
    monkeypatch.setattr(run_module, "load_causal_lm", lambda name, **kw: loaded.append(name) or real_load(name, **kw))
    base = ["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--teacher_cache", str(tmp_path / "cache"),
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"]
    for impl in ("fused", "simple"):
        result = train(load_config([*base, "--output_dir", str(tmp_path / impl), "--loss_impl", impl]).config)
        assert result.final_dir.is_dir()
        logged = [e for e in json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"] if "distill_loss" in e]
        assert logged and logged[0]["distill_loss"] > 0
    assert loaded == [str(model_dirs["student"])] * 2  # the teacher was never loaded
    with pytest.raises(ConfigError, match="'temperature' is 2.0 in the cache but 3.0 here"):
        train(load_config([*base, "--output_dir", str(tmp_path / "x"), "--distillation.temperature", "3"]).config)
    with pytest.raises(ConfigError, match="'max_seq_length' is 512 in the cache but 128 here"):
        train(load_config([*base, "--output_dir", str(tmp_path / "y"), "--max_seq_length", "128"]).config)
    other = tmp_path / "other.jsonl"
    other.write_text(pc_file.read_text().replace("answer", "reply"))
    with pytest.raises(ConfigError, match="'data_files'"):
        train(load_config([*base[:2], "--train_file", str(other), *base[4:], "--output_dir", str(tmp_path / "z")]).config)


def test_cache_and_live_teacher_train_alike(model_dirs, pc_file, tmp_path):
    """With every token kept (top_k = vocab - 1), cached and live training follow the same trajectory."""
    from nlm.models.loading import load_tokenizer

    vocab = len(load_tokenizer(str(model_dirs["teacher"])))
    assert main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--train_file", str(pc_file),
                 "--output", str(tmp_path / "cache"), "--top_k", str(vocab - 1)]) == 0
    common = ["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--max_steps", "4",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--eval_file", str(pc_file)]
    live = train(load_config([*common, "--teacher_model", str(model_dirs["teacher"]), "--output_dir", str(tmp_path / "live")]).config)
    cached = train(load_config([*common, "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "cached")]).config)
    assert cached.metrics["eval_loss"] == pytest.approx(live.metrics["eval_loss"], rel=1e-3)


def test_missing_or_foreign_cache_is_a_clear_error(model_dirs, pc_file, tmp_path):
    config = load_config(["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file),
                          "--teacher_cache", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")]).config
    with pytest.raises(ConfigError, match="no manifest.json"):
        train(config)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    assert _build(model_dirs, pc_file, tmp_path / "busy") == 2
