"""Teacher cache: build, resume, fingerprint checks, and training from it without the teacher."""

import json

import pytest
import torch

from nlm.apps.train import train
from nlm.cli import main
from nlm.config.sources import load_config
from nlm.distill.cache import TeacherCache, bytes_per_token
from nlm.errors import ConfigError


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
    # the stored fp16 top-k and the fp32 tail sum to one after rounding (renormalised when written)
    probs = targets.logp.double().exp().sum(-1) + targets.tail_logp.double().exp()
    torch.testing.assert_close(probs, torch.ones_like(probs), rtol=0, atol=1e-5)
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
    torch.testing.assert_close(cached.logp, expected.values, rtol=2e-3, atol=1e-4)  # float16, rounded down: one step


def test_interrupted_build_resumes(model_dirs, pc_file, tmp_path, monkeypatch):
    import nlm.apps.teacher_cache as builder

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
    import nlm.apps.train as run_module

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


# --- integrity ------------------------------------------------------------------------------------------

def test_stored_targets_sum_to_one_after_fp16_rounding_even_when_peaked():
    from nlm.apps.teacher_cache import rounded_targets

    torch.manual_seed(0)
    logits = torch.randn(200, 1000) * torch.tensor([1.0, 8.0, 30.0, 200.0]).repeat_interleave(50)[:, None]
    top = torch.log_softmax(logits, -1).topk(16, dim=-1).values
    stored, tail = rounded_targets(top)
    assert stored.dtype == torch.float16 and tail.dtype == torch.float32
    total = stored.double().exp().sum(-1) + tail.double().exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    naive = top.to(torch.float16).double().exp().sum(-1)  # rounding alone can push the top-k mass over one
    assert (naive > 1).any() and torch.isfinite(tail).all()
    torch.testing.assert_close(stored.float(), top, rtol=2e-3, atol=1e-4)  # within one fp16 step of the teacher


def test_fingerprint_covers_line_limit_tokenisation_and_teacher_weights(model_dirs, pc_file, tmp_path, tokenizer):
    from nlm.distill.cache import CacheMismatchError, cache_fingerprint, compare_fingerprints

    def fingerprint(*extra):
        config = load_config(["--teacher_model", str(model_dirs["teacher"]), "--train_file", str(pc_file), *extra]).config
        return cache_fingerprint(config, tokenizer, 16)

    base = fingerprint()
    assert base["teacher_weights"].startswith("sha256:") and base["tokenize_settings"]["max_line_bytes"] > 0
    with pytest.raises(CacheMismatchError, match="'tokenize_settings'"):
        compare_fingerprints(fingerprint("--max_line_bytes", "2048"), base, tmp_path)
    with pytest.raises(CacheMismatchError, match="'completion_only_loss'"):
        compare_fingerprints(fingerprint("--completion_only_loss", "false"), base, tmp_path)
    other = fingerprint("--teacher_model", str(model_dirs["student"]))
    assert other["teacher_weights"] != base["teacher_weights"]
    other["teacher_model"] = base["teacher_model"]  # same path, other weights saved there
    with pytest.raises(CacheMismatchError, match="'teacher_weights'"):
        compare_fingerprints(other, base, tmp_path)
    assert issubclass(CacheMismatchError, ConfigError)


def test_resume_refuses_shards_of_other_teacher_weights(model_dirs, pc_file, tmp_path, monkeypatch, tokenizer, capsys):
    import shutil

    import nlm.apps.teacher_cache as builder
    from nlm.models.scratch import build_causal_lm

    teacher = tmp_path / "teacher"
    shutil.copytree(model_dirs["teacher"], teacher)
    real, calls = builder.save_shard, {"n": 0}

    def crash_on_second(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, rows)

    monkeypatch.setattr(builder, "save_shard", crash_on_second)
    assert _build({"teacher": teacher}, pc_file, tmp_path / "cache") == 130
    monkeypatch.setattr(builder, "save_shard", real)
    # The teacher folder now holds other weights (e.g. a newer fine-tune saved over it).
    build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=4, seed=99).save_pretrained(teacher)
    capsys.readouterr()
    assert _build({"teacher": teacher}, pc_file, tmp_path / "cache") == 2
    assert "'teacher_weights'" in capsys.readouterr().err
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"][0]["file"]  # the old shard is kept
    assert _build({"teacher": teacher}, pc_file, tmp_path / "cache", "--overwrite") == 0


def test_per_example_counts_are_checked_on_every_batch(model_dirs, pc_file, tmp_path):
    from nlm.distill.cache import CacheMismatchError
    from nlm.distill.teacher import CachedTeacher

    assert _build(model_dirs, pc_file, tmp_path / "cache") == 0
    cache = TeacherCache(tmp_path / "cache")
    first, second = next((a, b) for a in range(24) for b in range(24) if cache.example_counts([a]) != cache.example_counts([b]))
    counts = cache.example_counts([first, second])
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, : counts[0]] = True
    mask[1, : counts[1]] = True
    teacher = CachedTeacher(cache)
    assert teacher.dense_rows({"index": torch.tensor([first, second])}, mask, torch.device("cpu")).ids.shape[0] == sum(counts)
    # Same total, rows shifted between the two examples: refused, naming the example.
    swapped = torch.zeros_like(mask)
    swapped[0, : counts[1]] = True
    swapped[1, : counts[0]] = True
    with pytest.raises(CacheMismatchError, match=f"example {first} has {counts[0]} cached target tokens but {counts[1]}"):
        teacher.dense_rows({"index": torch.tensor([first, second])}, swapped, torch.device("cpu"))


def test_cached_rows_equal_live_top_k_on_a_shuffled_padded_batch_of_a_trained_teacher(model_dirs, pc_file, tmp_path):
    """A teacher trained until peaked (top-1 near probability one: where fp16 rounding bites), a shuffled
    batch padded to its longest example: the cache's rows, read by index, are the live teacher's top-k."""
    from transformers import AutoModelForCausalLM

    from nlm.data.prepare import prepare_datasets
    from nlm.data.tokenize import PaddingCollator
    from nlm.distill.teacher import CachedTeacher, LiveTeacher
    from nlm.models.loading import load_tokenizer

    trained = train(load_config([
        "--student_model", str(model_dirs["teacher"]), "--distillation.alpha", "0", "--train_file", str(pc_file),
        "--output_dir", str(tmp_path / "runs"), "--run_name", "teacher", "--max_steps", "40", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--lr_scheduler_type", "constant"]).config).final_dir
    assert _build({"teacher": trained}, pc_file, tmp_path / "cache") == 0
    tokenizer = load_tokenizer(str(trained))
    config = load_config(["--teacher_cache", str(tmp_path / "cache"), "--train_file", str(pc_file)]).config
    data = prepare_datasets(config, tokenizer, cache_root=tmp_path / "tok", with_index=True).train
    order = [17, 3, 22, 8, 0, 11, 5]
    batch = PaddingCollator(0)([data[i] for i in order])
    assert (batch["attention_mask"] == 0).any()  # padded
    mask = batch["labels"][:, 1:] != -100
    cached = CachedTeacher(TeacherCache(tmp_path / "cache")).dense_rows(batch, mask, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(trained)
    live_logits = LiveTeacher(model, "cpu", len(tokenizer)).row_source(batch, mask, torch.device("cpu"))(0, int(mask.sum()))
    live = torch.log_softmax(live_logits / 2.0, -1)
    assert live.max(-1).values.exp().mean() > 0.5  # peaked: the trained teacher is sure of most tokens
    top = live.topk(16, dim=-1)
    assert (cached.ids == top.indices).float().mean() > 0.99  # all but exact ties
    torch.testing.assert_close(cached.logp, live.gather(-1, cached.ids), rtol=1e-3, atol=4e-3)  # fp16 storage
    torch.testing.assert_close(cached.tail_logp.exp(), (1 - top.values.exp().sum(-1)).clamp(min=0), rtol=0, atol=2e-3)


def test_teacher_device_is_honoured_and_tokenised_data_stay_on_disk(model_dirs, pc_file, tmp_path, capsys):
    assert _build(model_dirs, pc_file, tmp_path / "bad", "--teacher_device", "cuda:7") == 2
    assert "'cuda:7' was requested" in capsys.readouterr().err
    assert _build(model_dirs, pc_file, tmp_path / "cache", "--teacher_device", "cpu") == 0
    arrow = list((tmp_path / "cache" / "tokenized").rglob("*.arrow"))
    assert arrow and all(f.stat().st_size > 0 for f in arrow)  # memory-mapped from here, not held in memory


@pytest.mark.slow
def test_hidden_states_from_the_cache_train_like_the_live_teacher(model_dirs, pc_file, tmp_path, capsys):
    """distillation.hidden_states with a cache built for it: the chosen teacher layers are stored (bfloat16,
    2·H bytes per layer per token on top of the top-k), and training from it follows the live teacher's
    trajectory: the hidden-state term (stored in bfloat16) and the total loss at every step. (Final weights are
    not compared: the top-k targets' fp16 rounding moves Adam's per-weight steps by up to lr each.)"""
    from nlm.models.loading import load_tokenizer

    config = tmp_path / "hidden.yaml"
    config.write_text("distillation:\n  hidden_states: {weight: 1.0, loss: mse, layers: auto}\n")
    vocab = len(load_tokenizer(str(model_dirs["teacher"])))
    assert main(["teacher-cache", "--config", str(config), "--teacher", str(model_dirs["teacher"]), "--student_model",
                 str(model_dirs["student"]), "--train_file", str(pc_file), "--output", str(tmp_path / "cache"),
                 "--top_k", str(vocab - 1), "--shard_examples", "10"]) == 0
    manifest = TeacherCache(tmp_path / "cache").manifest
    assert manifest["hidden_layers"] == [1, 3]  # 2 student layers spread over 4 teacher layers
    assert manifest["bytes_per_token"] == bytes_per_token(vocab - 1, vocab) + 2 * 2 * 64
    assert f"{manifest['bytes_per_token']} bytes per token" in capsys.readouterr().out
    common = ["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--max_steps", "3",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no"]
    live = train(load_config([*common, "--teacher_model", str(model_dirs["teacher"]), "--output_dir", str(tmp_path / "live")],
                             config).config)
    cached = train(load_config([*common, "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "cached")],
                               config).config)
    logs = {name: [e for e in json.loads((r.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
            for name, r in (("live", live), ("cached", cached))}
    assert len(logs["live"]) == len(logs["cached"]) == 3
    for a, b in zip(logs["live"], logs["cached"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
        assert b["hidden_states_loss"] == pytest.approx(a["hidden_states_loss"], rel=1e-3) and a["hidden_states_loss"] > 0
    # a cache without hidden states cannot serve the term: refused by name before training
    assert main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--train_file", str(pc_file), "--output",
                 str(tmp_path / "plain"), "--top_k", "8"]) == 0
    with pytest.raises(ConfigError, match="teacher cache built with distillation.hidden_states"):
        train(load_config([*common, "--teacher_cache", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "x")], config).config)


def test_ids_of_a_49k_vocabulary_are_stored_in_two_bytes_and_read_back_exactly(tmp_path):
    """SmolLM2-sized vocabulary (49,152): uint16 ids (k = 255 fits 1 KiB per token), the same ids on read."""
    from nlm.distill.cache import FORMAT, VERSION, ShardRows, id_dtype, save_shard, write_manifest

    vocab, k = 49_152, 255
    assert id_dtype(vocab) == torch.uint16 and bytes_per_token(k, vocab) == 1024
    assert id_dtype(32_000) == torch.int16 and id_dtype(65_536) == torch.uint16 and id_dtype(128_256) == torch.int32
    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(7)])  # ids above 32,767 too
    assert int(ids.max()) > 32_767
    logp = torch.log_softmax(torch.randn(7, k, generator=generator), dim=-1)
    rows = ShardRows(ids.to(id_dtype(vocab)), logp.half(), torch.full((7,), -30.0), torch.tensor([0, 3, 7]))
    save_shard(tmp_path / "shard-00000.safetensors", rows)
    write_manifest(tmp_path, {"format": FORMAT, "version": VERSION, "complete": True, "top_k": k, "temperature": 1.0,
                              "vocab_size": vocab, "fingerprint": {},
                              "shards": [{"file": "shard-00000.safetensors", "first_example": 0, "examples": 2}]})
    got = TeacherCache(tmp_path).targets([1, 0])
    assert got.ids.dtype == torch.int64
    assert torch.equal(got.ids, torch.cat([ids[3:], ids[:3]]))
    assert (tmp_path / "shard-00000.safetensors").stat().st_size < 7 * 1024 + 4096


def test_a_cache_whose_shards_hold_different_id_types_reads_back_across_them(tmp_path):
    """A build started when ids were int32 and resumed after they became uint16: a batch spanning both shards."""
    from nlm.distill.cache import FORMAT, VERSION, ShardRows, save_shard, write_manifest

    vocab, k = 49_152, 4
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (6, k), generator=generator)
    logp = torch.log_softmax(torch.randn(6, k, generator=generator), dim=-1)
    for number, (dtype, rows) in enumerate(((torch.int32, slice(0, 3)), (torch.uint16, slice(3, 6)))):
        save_shard(tmp_path / f"shard-{number:05d}.safetensors",
                   ShardRows(ids[rows].to(dtype), logp[rows].half(), torch.full((3,), -30.0), torch.tensor([0, 3])))
    write_manifest(tmp_path, {"format": FORMAT, "version": VERSION, "complete": True, "top_k": k, "temperature": 1.0,
                              "vocab_size": vocab, "fingerprint": {}, "shards": [
                                  {"file": "shard-00000.safetensors", "first_example": 0, "examples": 1},
                                  {"file": "shard-00001.safetensors", "first_example": 1, "examples": 1}]})
    got = TeacherCache(tmp_path).targets([1, 0])
    assert torch.equal(got.ids, torch.cat([ids[3:], ids[:3]]))
