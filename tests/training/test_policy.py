"""On-policy (GKD) and sequence-level distillation: the step policy, its masks, its seeding and its wiring."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import nlm.training.policy as policy_module
from nlm.apps.train import train
from nlm.cli import main
from nlm.config.settings import DistillationConfig
from nlm.config.sources import load_config
from nlm.data.tokenize import IGNORE_INDEX, PaddingCollator
from nlm.distill.teacher import LiveTeacher
from nlm.errors import ConfigError
from nlm.models.sampling import SamplingSettings, cut_at_stop, sample_completions
from nlm.training.policy import StepPolicy, on_policy_steps, prompt_length


def _config(model_dirs, data_file, out, *extra, teacher=None):
    args = [
        "--teacher_model", str(teacher or model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
        "--train_file", str(data_file), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--max_steps", "3", "--save_strategy", "no",
        "--distillation.max_new_tokens", "6", *extra,
    ]
    return load_config(args).config


def _batch(tokenizer, rows):
    """Collated rows as the trainer sees them: prompt ids (labels -100) + completion ids (labels = ids) + EOS."""
    examples = []
    for prompt, completion in rows:
        p = tokenizer(prompt + "\n")["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    return PaddingCollator(tokenizer.pad_token_id)(examples)


def _policy(model_dirs, tokenizer, **options):
    teacher = LiveTeacher(AutoModelForCausalLM.from_pretrained(model_dirs["teacher"]), "cpu", len(tokenizer))
    config = DistillationConfig(**{"lmbda": 1.0, "max_new_tokens": 6, **options})
    return StepPolicy(config, seed=3, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer, teacher=teacher)


ROWS = [("question: what is 1 plus 1?", "answer: 2"), ("hello", "world, distillation makes small models strong")]


def test_schedule_gives_the_share_lmbda_at_every_point():
    for lmbda in (0.0, 0.25, 0.5, 0.7, 1.0):
        assert on_policy_steps(100, lmbda) == round(100 * lmbda)
        flags = [on_policy_steps(s + 1, lmbda) - on_policy_steps(s, lmbda) for s in range(40)]
        assert all(abs(sum(flags[:n]) - n * lmbda) < 1 for n in range(1, 41))


def test_no_policy_when_nothing_is_generated():
    assert StepPolicy.from_config(DistillationConfig(), seed=0, pad_id=0, tokenizer=None, teacher=None) is None


def test_masks_prompt_after_eos_and_padding(model_dirs, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    # Many of the vocabulary's ids as the model's own stop tokens, so some rows stop early and some do not.
    student.generation_config.eos_token_id = list(range(0, len(tokenizer), 2))
    batch = _batch(tokenizer, ROWS)
    batch["source"], batch["source_name"] = torch.tensor([1, 0]), ["b", "a"]  # a mixture's per-row keys
    policy = _policy(model_dirs, tokenizer, max_new_tokens=8)
    prompts = policy._prompts(batch)
    for row, prompt in enumerate(prompts):
        assert len(prompt) == prompt_length(batch["labels"][row], batch["attention_mask"][row])
        assert batch["labels"][row, len(prompt)] != IGNORE_INDEX and (batch["labels"][row, : len(prompt)] == IGNORE_INDEX).all()
    [rebuilt], source = policy.prepare([batch], step=0, student=student)
    assert source == "student"
    assert rebuilt["source"].tolist() == [1, 0] and rebuilt["source_name"] == ["b", "a"]
    stops = set(student.generation_config.eos_token_id)
    for row, prompt in enumerate(prompts):
        ids, labels, attention = rebuilt["input_ids"][row], rebuilt["labels"][row], rebuilt["attention_mask"][row]
        length = int(attention.sum())
        assert ids[: len(prompt)].tolist() == prompt  # the prompt is kept
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()  # and never a target
        completion = ids[len(prompt):length].tolist()
        assert labels[len(prompt):length].tolist() == completion  # every generated token is a target
        assert (labels[length:] == IGNORE_INDEX).all() and (attention[length:] == 0).all()  # padding is not
        assert all(t not in stops for t in completion[:-1])  # nothing after a stop token...
        assert completion[-1] in stops or len(completion) == 8  # ...which is kept as the last target


def test_generation_is_deterministic_for_a_seed_and_leaves_the_rng(model_dirs, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    batch = _batch(tokenizer, ROWS * 3)
    policy = _policy(model_dirs, tokenizer)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, _ = policy.prepare([batch], step=5, student=student)
    assert torch.equal(torch.get_rng_state(), state)  # sampling forks the RNG: training randomness is unchanged
    again, _ = policy.prepare([batch], step=5, student=student)
    other, _ = policy.prepare([batch], step=6, student=student)
    other_rank, _ = policy.prepare([batch], step=5, student=student, rank=1)
    assert torch.equal(first[0]["input_ids"], again[0]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], other_rank[0]["input_ids"])


def test_sampling_restores_train_mode_and_cuts_at_the_first_stop(model_dirs, tokenizer):
    assert cut_at_stop([5, 6, 2, 7, 2], [2]) == [5, 6, 2] and cut_at_stop([5, 6], [2]) == [5, 6]
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).train()
    seen = []
    handle = student.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    out = sample_completions(student, [[1, 5, 6], [1]], SamplingSettings(max_new_tokens=3, temperature=0,
                             num_return_sequences=2), stop_ids=[], pad_id=0)
    handle.remove()
    assert len(out) == 4 and all(len(c) == 3 for c in out) and out[0] == out[1]  # greedy: both returns equal
    assert seen and not any(seen) and student.training  # generated in eval mode, handed back in train mode


@pytest.mark.slow
def test_student_as_its_own_teacher_has_zero_divergence(model_dirs, pc_file, tmp_path):
    config = _config(model_dirs, pc_file, tmp_path / "out", "--distillation.lmbda", "1", "--learning_rate", "1e-9",
                     "--distillation.divergence", "reverse_kl", teacher=model_dirs["student"])
    result = train(config)
    logged = [e for e in json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(e["on_policy_share"] == 1.0 and e["generated_length"] > 0 for e in logged)
    assert all(abs(e["distill_loss"]) < 1e-5 and abs(e["loss"]) < 1e-4 for e in logged)


@pytest.mark.slow
def test_lmbda_zero_is_todays_path_bit_for_bit(model_dirs, pc_file, tmp_path, monkeypatch):
    """A policy that never generates, forced into the loop, changes nothing: same weights as no policy at all."""
    plain = train(_config(model_dirs, pc_file, tmp_path / "plain", "--gradient_accumulation_steps", "2"))
    monkeypatch.setattr(StepPolicy, "from_config", classmethod(lambda cls, config, **kw: cls(config, **kw)))
    hooked = train(_config(model_dirs, pc_file, tmp_path / "hooked", "--gradient_accumulation_steps", "2"))
    a, b = load_file(str(plain.final_dir / "model.safetensors")), load_file(str(hooked.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [e for e in json.loads((hooked.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
    assert all(e["on_policy_share"] == 0.0 for e in logs)


@pytest.mark.slow
def test_one_generation_per_optimiser_step_and_a_frozen_teacher(model_dirs, pc_file, tmp_path, monkeypatch):
    import nlm.apps.train as run_module

    calls = []
    real = policy_module.sample_completions

    def counting(model, prompts, *args, **kwargs):
        calls.append((model, len(prompts)))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(policy_module, "sample_completions", counting)
    seen = {}
    original = run_module.DistillationTrainer

    class Spy(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["trainer"] = self
            seen["before"] = {k: v.clone() for k, v in self.teacher.model.state_dict().items()}

    monkeypatch.setattr(run_module, "DistillationTrainer", Spy)
    result = train(_config(model_dirs, pc_file, tmp_path / "out", "--gradient_accumulation_steps", "3",
                           "--distillation.lmbda", "0.5", "--distillation.seq_kd", "--max_steps", "4"))
    trainer = seen["trainer"]
    teacher = trainer.teacher.model
    # 4 steps: on-policy at steps 1 and 3 (student samples), teacher samples at 0 and 2; one call per step for
    # all 3 micro-batches of 4 rows.
    assert [(m is teacher, n) for m, n in calls] == [(True, 12), (False, 12), (True, 12), (False, 12)]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(torch.equal(v, seen["before"][k]) for k, v in teacher.state_dict().items())
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    assert metadata["config"]["distillation"]["lmbda"] == 0.5 and metadata["config"]["distillation"]["seq_kd"] is True
    assert metadata["config"]["distillation"]["max_new_tokens"] == 6
    shares = [e["on_policy_share"] for e in metadata["log_history"] if "loss" in e]
    assert shares == [0.0, 0.5, round(1 / 3, 4), 0.5]


@pytest.mark.slow
def test_lora_student_generates_without_merging(model_dirs, pc_file, tmp_path):
    result = train(_config(model_dirs, pc_file, tmp_path / "out", "--lora.enabled", "--lora.r", "4",
                           "--distillation.lmbda", "1"))
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    logs = [e for e in json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
    assert all(e["generated_length"] > 0 and e["generation_seconds"] > 0 for e in logs)


@pytest.mark.parametrize("option", [["--distillation.lmbda", "0.5"], ["--distillation.seq_kd"]])
def test_a_teacher_cache_cannot_score_generated_text(tmp_path, option, capsys):
    with pytest.raises(ConfigError, match=option[0].lstrip("-")):
        load_config(["--teacher_cache", str(tmp_path), *option])
    code = main(["train", "--student_model", "s", "--train_file", str(tmp_path / "x.jsonl"), "--teacher_cache",
                 str(tmp_path), *option])
    assert code == 2
    err = capsys.readouterr().err
    assert option[0].lstrip("-") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_on_policy_needs_a_live_teacher(model_dirs, pc_file, tmp_path):
    config = load_config(["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file),
                          "--output_dir", str(tmp_path), "--distillation.lmbda", "1"]).config
    with pytest.raises(ConfigError, match="distillation.lmbda > 0 needs a live teacher"):
        train(config)


@pytest.mark.slow
def test_resumed_on_policy_run_matches_an_uninterrupted_one(model_dirs, pc_file, tmp_path, monkeypatch):
    """Samples are seeded by (seed, step, rank) and the schedule by the step: a resume continues both exactly."""
    from transformers import TrainerCallback

    import nlm.apps.train as run_module

    extra = ("--distillation.lmbda", "0.5", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    straight = train(_config(model_dirs, pc_file, tmp_path / "a", *extra))

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    original = run_module.install_callbacks
    monkeypatch.setattr(run_module, "install_callbacks", lambda trainer: (original(trainer), trainer.add_callback(Crash())))
    with pytest.raises(KeyboardInterrupt):
        train(_config(model_dirs, pc_file, tmp_path / "b", *extra))
    monkeypatch.setattr(run_module, "install_callbacks", original)
    resumed = train(_config(model_dirs, pc_file, tmp_path / "b", *extra, "--resume"))
    a, b = load_file(str(straight.final_dir / "model.safetensors")), load_file(str(resumed.final_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    logs = [e for e in json.loads((resumed.final_dir / "training_metadata.json").read_text())["log_history"] if "loss" in e]
    assert logs[-1]["on_policy_share"] == 0.5
