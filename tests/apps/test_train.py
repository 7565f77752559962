"""End-to-end training in-process on tiny models: outputs, LoRA, resume, best model, guards."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from nlm.apps.train import train
from nlm.config.sources import load_config
from nlm.errors import ConfigError, ModelLoadError, RunExistsError, TrainingDivergedError


def _config(model_dirs, data_file, out, *extra):
    args = [
        "--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
        "--train_file", str(data_file), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "2", "--max_steps", "6", "--save_steps", "3", *extra,
    ]
    return load_config(args).config


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_full_fine_tune_writes_a_loadable_model_and_metadata(model_dirs, pc_file, tmp_path, tokenizer):
    result = train(_config(model_dirs, pc_file, tmp_path / "out", "--eval_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "3"))
    final = result.final_dir
    assert final == (tmp_path / "out" / "distill" / "final").resolve()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "training_metadata.json"):
        assert (final / name).is_file(), name
    assert not (final / "training_args.bin").exists()
    assert (result.run_dir / "checkpoint-3").is_dir() and (result.run_dir / "checkpoint-6").is_dir()
    metadata = json.loads((final / "training_metadata.json").read_text())
    assert metadata["versions"]["torch"] and metadata["versions"]["transformers"]
    assert metadata["config"]["student_model"] == str(model_dirs["student"])
    assert metadata["data"]["train_files"] and metadata["data"]["train_examples"] == 18
    assert metadata["precision"] == "fp32" and metadata["device"] == "cpu"
    assert metadata["global_step"] == 6
    for key in ("eval_loss", "eval_perplexity", "eval_teacher_kl", "eval_teacher_agreement"):
        assert key in metadata["final_metrics"], key
    logged = [entry for entry in metadata["log_history"] if "loss" in entry]
    assert logged and all({"task_loss", "distill_loss", "tokens_per_second", "samples_per_second", "grad_norm", "learning_rate"} <= set(e) for e in logged)

    model = AutoModelForCausalLM.from_pretrained(final)
    ids = tokenizer("question: what is 2 plus 2?\n", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] > ids.shape[1]
    student_before = _weights(model_dirs["student"])
    after = _weights(final)
    assert any(not torch.equal(student_before[k], after[k]) for k in after)


def test_teacher_stays_frozen(model_dirs, pc_file, tmp_path, monkeypatch):
    import nlm.apps.train as run_module

    seen = {}
    original = run_module.DistillationTrainer

    class Spy(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["teacher"] = self.teacher.model
            seen["before"] = {k: v.clone() for k, v in self.teacher.model.state_dict().items()}

    monkeypatch.setattr(run_module, "DistillationTrainer", Spy)
    train(_config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "3"))
    teacher = seen["teacher"]
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, seen["before"][key]), key


def test_lora_run_writes_an_adapter_that_peft_loads_and_a_merged_model(model_dirs, pc_file, tmp_path, tokenizer):
    from peft import AutoPeftModelForCausalLM

    result = train(_config(model_dirs, pc_file, tmp_path / "out", "--lora.enabled", "--lora.r", "4", "--merge_lora"))
    final = result.final_dir
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert not (final / "model.safetensors").exists()
    adapted = AutoPeftModelForCausalLM.from_pretrained(final)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    ids = tokenizer("hello world\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    metadata = json.loads((final / "training_metadata.json").read_text())
    assert metadata["parameters"]["trainable"] < metadata["parameters"]["total"] / 5


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.slow  # two trainings and a resume each: among the fast suite's slowest
@pytest.mark.parametrize("extra", [[], ["--lora.enabled", "--lora.r", "4", "--lora.dropout", "0.2"]])
def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(model_dirs, pc_file, tmp_path, monkeypatch, extra):
    # Randomness is present: the data are shuffled every epoch (6 steps of 4 over 24 examples, one reshuffle)
    # and, in the LoRA case, adapter dropout draws new masks at every step.
    straight = train(_config(model_dirs, pc_file, tmp_path / "a", *extra))
    import nlm.apps.train as run_module

    original = run_module.install_callbacks

    def with_crash(trainer):
        original(trainer)
        trainer.add_callback(_Crash())

    monkeypatch.setattr(run_module, "install_callbacks", with_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_config(model_dirs, pc_file, tmp_path / "b", *extra))
    monkeypatch.setattr(run_module, "install_callbacks", original)
    with pytest.raises(RunExistsError, match="unfinished run; pass --resume"):
        train(_config(model_dirs, pc_file, tmp_path / "b", *extra))
    torch.rand(5)  # the process's random state moves on; the run must not depend on it
    resumed = train(_config(model_dirs, pc_file, tmp_path / "b", "--resume", *extra))
    name = "adapter_model.safetensors" if extra else "model.safetensors"
    a, b = load_file(str(straight.final_dir / name)), load_file(str(resumed.final_dir / name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_best_model_is_chosen_by_eval_loss(model_dirs, pc_file, tmp_path):
    result = train(_config(
        model_dirs, pc_file, tmp_path / "out", "--eval_split", "0.25", "--eval_strategy", "steps",
        "--eval_steps", "2", "--load_best_model_at_end", "--save_total_limit", "5", "--learning_rate", "5e-3",
    ))
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    evals = [e for e in metadata["log_history"] if "eval_loss" in e and e["step"] in (2, 4, 6)]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert metadata["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert metadata["best_metric"] == pytest.approx(best["eval_loss"])
    best_weights = _weights(result.run_dir / f"checkpoint-{best['step']}")
    final_weights = _weights(result.final_dir)
    for key in final_weights:
        torch.testing.assert_close(final_weights[key], best_weights[key])


@pytest.mark.slow  # several full trainings
def test_finished_run_is_never_overwritten_without_being_asked(model_dirs, pc_file, tmp_path):
    config = _config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "1")
    first = train(config)
    stamp = (first.final_dir / "training_metadata.json").read_text()
    with pytest.raises(RunExistsError, match="already holds a finished run; pass --resume .* --overwrite"):
        train(config)
    assert (first.final_dir / "training_metadata.json").read_text() == stamp
    train(_config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "1", "--overwrite"))
    with pytest.raises(RunExistsError, match="nothing to resume"):
        train(_config(model_dirs, pc_file, tmp_path / "fresh", "--resume"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_checkpoints(model_dirs, pc_file, tmp_path, monkeypatch):
    import nlm.distill.engines.fused as trainer_module  # the fused engine calls it (nlm.distill.engines)

    real = trainer_module.fused_distillation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(trainer_module, "fused_distillation_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="NaN/inf for 3 batches in a row .* keeping the last saved checkpoint"):
        train(_config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "10"))
    checkpoint = tmp_path / "out" / "distill" / "checkpoint-3"
    assert checkpoint.is_dir()
    assert all(torch.isfinite(v).all() for v in _weights(checkpoint).values())


def test_missing_models_fail_before_any_work(model_dirs, pc_file, tmp_path):
    config = load_config([
        "--teacher_model", str(tmp_path / "no-teacher"), "--student_model", str(model_dirs["student"]),
        "--train_file", str(pc_file), "--output_dir", str(tmp_path / "out"),
    ]).config
    with pytest.raises(ModelLoadError, match="no-teacher not found"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_teacher_is_required_unless_alpha_is_zero(model_dirs, pc_file, tmp_path):
    config = load_config(["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file)]).config
    with pytest.raises(ConfigError, match="teacher_model is required when distillation.alpha > 0"):
        train(config)
    plain = load_config([
        "--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--distillation.alpha", "0",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
    ]).config
    assert train(plain).final_dir.is_dir()


def test_eval_strategy_without_eval_data_is_an_error(model_dirs, pc_file, tmp_path):
    with pytest.raises(ConfigError, match="needs evaluation data"):
        train(_config(model_dirs, pc_file, tmp_path / "out", "--eval_strategy", "steps"))


@pytest.mark.parametrize("extra", [
    [],
    ["--lora.enabled", "--lora.include_lm_head", "--lora.r", "4", "--lora.dropout", "0"],  # dropout masks differ by chunk
    ["--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2"],
    # The rest run in the full suite only (the fast suite keeps the plain, LoRA and accumulation cases).
    pytest.param(["--distillation.divergence", "jsd"], marks=pytest.mark.slow),
    pytest.param(["--gradient_checkpointing"], marks=pytest.mark.slow),
    pytest.param(["--gradient_checkpointing", "--lora.enabled", "--lora.dropout", "0"], marks=pytest.mark.slow),
])
def test_fused_and_simple_paths_train_to_the_same_weights(model_dirs, pc_file, tmp_path, extra):
    runs, metrics = {}, {}
    for impl in ("fused", "simple"):
        result = train(_config(model_dirs, pc_file, tmp_path / impl, "--max_steps", "4", "--loss_impl", impl,
                               "--eval_file", str(pc_file), *extra))
        name = "adapter_model.safetensors" if "--lora.enabled" in extra else "model.safetensors"
        runs[impl] = load_file(str(result.final_dir / name))
        metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
        assert metadata["loss_impl"] == impl
        metrics[impl] = result.metrics
    for key in ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_teacher_kl", "eval_teacher_agreement"):
        assert metrics["fused"][key] == pytest.approx(metrics["simple"][key], rel=1e-4, abs=1e-6), key
    for key in runs["fused"]:
        torch.testing.assert_close(runs["fused"][key], runs["simple"][key], rtol=1e-4, atol=1e-5, msg=key)


def test_tied_embeddings_train_the_same_fused_or_simple(tmp_path, tokenizer, pc_file):
    from nlm.models.scratch import build_causal_lm

    teacher = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=48, num_layers=2, seed=4)
    student = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, seed=5, tie_word_embeddings=True)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    for name, model in (("t", teacher), ("s", student)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    dirs = {"teacher": tmp_path / "t", "student": tmp_path / "s"}
    finals = {impl: train(_config(dirs, pc_file, tmp_path / impl, "--max_steps", "3", "--loss_impl", impl)).final_dir
              for impl in ("fused", "simple")}
    a, b = load_file(str(finals["fused"] / "model.safetensors")), load_file(str(finals["simple"] / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_models_that_post_process_logits_fall_back_to_the_simple_loss(tmp_path, tokenizer, pc_file, caplog):
    import logging

    from nlm.models.scratch import build_causal_lm

    for name, seed in (("t", 1), ("s", 2)):
        model = build_causal_lm("granite", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, seed=seed, logits_scaling=4.0)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with caplog.at_level(logging.WARNING):
        result = train(_config({"teacher": tmp_path / "t", "student": tmp_path / "s"}, pc_file, tmp_path / "out", "--max_steps", "2"))
    assert "post-processes its logits" in caplog.text
    assert json.loads((result.final_dir / "training_metadata.json").read_text())["loss_impl"] == "simple"


def test_overwrite_replaces_only_what_an_earlier_run_wrote(model_dirs, pc_file, tmp_path):
    from nlm.config.paths import MARKER, read_marker
    from nlm.errors import FolderNotOwnedError

    first = train(_config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "1", "--save_steps", "1"))
    assert read_marker(first.run_dir)["created_by"] == "nlm train"
    (first.run_dir / "notes.txt").write_text("why this run matters")
    (first.final_dir / "eval_by_hand.md").write_text("my notes on the model")  # inside final/, which nlm owns
    (first.run_dir / "checkpoint-1" / "probe.ipynb").write_text("{}")
    second = train(_config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "2", "--save_steps", "2", "--overwrite"))
    assert sorted(p.name for p in second.run_dir.iterdir()) == [MARKER, "checkpoint-1", "checkpoint-2", "final", "notes.txt",
                                                              "run_fingerprint.json"]
    assert (second.run_dir / "notes.txt").read_text() == "why this run matters"
    assert (second.final_dir / "eval_by_hand.md").read_text() == "my notes on the model"
    assert sorted(p.name for p in (second.run_dir / "checkpoint-1").iterdir()) == ["probe.ipynb"]
    assert "eval_by_hand.md" not in read_marker(second.final_dir)["owns"]
    assert {"model.safetensors", "training_metadata.json"} <= set(read_marker(second.final_dir)["owns"])

    mine = tmp_path / "out" / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    with pytest.raises(FolderNotOwnedError, match="mine is not empty and was not created by nlm"):
        train(_config(model_dirs, pc_file, tmp_path / "out", "--run_name", "mine", "--overwrite"))
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]


def test_same_seed_same_adapters_different_seed_different_adapters(model_dirs, pc_file, tmp_path):
    def adapters(seed, folder):
        torch.rand(3)  # whatever the process drew before, the seed decides
        result = train(_config(model_dirs, pc_file, tmp_path / folder, "--max_steps", "2", "--seed", str(seed),
                               "--lora.enabled", "--lora.r", "4", "--lora.dropout", "0.2"))
        return load_file(str(result.final_dir / "adapter_model.safetensors"))

    a, b, c = adapters(7, "a"), adapters(7, "b"), adapters(8, "c")
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lora_a = [key for key in a if "lora_A" in key]
    assert lora_a and all(not torch.equal(a[key], c[key]) for key in lora_a)


def test_gradient_accumulation_4x1_equals_one_batch_of_4(model_dirs, pc_file, tmp_path):
    """Loss normalised by the step's target tokens: 4 micro-batches of 1 == 1 batch of 4 (same examples)."""
    finals = {}
    for name, batch, accumulation in (("4x1", "1", "4"), ("1x4", "4", "1")):
        result = train(_config(model_dirs, pc_file, tmp_path / name, "--max_steps", "3", "--save_strategy", "no",
                               "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation))
        finals[name] = _weights(result.final_dir)
    for key in finals["4x1"]:
        torch.testing.assert_close(finals["4x1"][key], finals["1x4"][key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_resume_refuses_other_data_or_models_and_records_changed_settings(model_dirs, pc_file, tmp_path):
    """--resume continues only the run the folder holds: other data or another model is refused by name
    (before any model loads); a new learning rate or a longer run is allowed, logged and recorded."""
    from nlm.training.fingerprint import FINGERPRINT_FILE

    first = train(_config(model_dirs, pc_file, tmp_path / "out", "--max_steps", "2", "--save_steps", "2"))
    assert (first.run_dir / FINGERPRINT_FILE).is_file()
    shutil.rmtree(first.final_dir)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(pc_file.read_text().replace("answer", "reply"))
    with pytest.raises(RunExistsError, match=r"started with other data \(train\)"):
        train(_config(model_dirs, other_data, tmp_path / "out", "--resume", "--max_steps", "3"))
    retrained = tmp_path / "teacher-v2"  # another teacher at a new path: its files differ
    shutil.copytree(model_dirs["teacher"], retrained)
    (retrained / "model.safetensors").write_bytes((retrained / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(RunExistsError, match="other teacher model"):
        train(_config({**model_dirs, "teacher": retrained}, pc_file, tmp_path / "out", "--resume", "--max_steps", "3"))
    resumed = train(_config(model_dirs, pc_file, tmp_path / "out", "--resume", "--max_steps", "3", "--save_steps", "2",
                            "--learning_rate", "5e-4"))
    resumed_meta = json.loads((resumed.final_dir / "training_metadata.json").read_text())["resumed"]
    assert resumed_meta["checkpoint"].endswith("checkpoint-2")
    assert resumed_meta["changed_settings"] == {"learning_rate": [0.001, 0.0005], "max_steps": [2, 3]}
