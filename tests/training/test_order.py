"""Mixing and curricula in real training runs: the order the trainer uses, resume, metadata, per-source logs."""

import json

import numpy as np
import pytest
from transformers import TrainerCallback

import nlm.apps.train as run_module
from nlm.apps.train import train
from nlm.commands.data_mix import Options as MixOptions
from nlm.commands.data_mix import run as run_mix
from nlm.config.sources import load_config
from nlm.data.prepare import prepare_datasets
from nlm.data.tokenize import PaddingCollator
from nlm.errors import ConfigError
from nlm.training.order import build_order
from tests.conftest import write_jsonl


def _sources(tmp_path):
    a = write_jsonl(tmp_path / "math.jsonl", [
        {"prompt": f"question: what is {i} plus {i}?", "completion": f"answer: {2 * i}", "difficulty": i % 7} for i in range(40)])
    b = write_jsonl(tmp_path / "chat.jsonl", [{"text": f"hello world number {i}"} for i in range(20)])
    return a, b


def _yaml(tmp_path, model_dirs, body):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"teacher_model: {model_dirs['teacher']}\nstudent_model: {model_dirs['student']}\noutput_dir: {tmp_path / 'out'}\n"
        "per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nlogging_steps: 2\nmax_steps: 6\nsave_steps: 3\n" + body)
    return path


def _mixture(tmp_path, model_dirs, extra=""):
    a, b = _sources(tmp_path)
    return _yaml(tmp_path, model_dirs, f"train_mixture:\n  - {{path: {a}, weight: 3}}\n  - {{path: {b}, weight: 1, name: greetings}}\n"
                 "mixture_size: 16\n" + extra)


def test_bad_weight_is_a_config_error_naming_the_field(tmp_path, model_dirs):
    a, b = _sources(tmp_path)
    path = _yaml(tmp_path, model_dirs, f"train_mixture:\n  - {{path: {a}, weight: 1}}\n  - {{path: {b}, weight: -2}}\n")
    with pytest.raises(ConfigError, match=r"train_mixture\[1\]\.weight"):
        load_config([], path)
    path = _yaml(tmp_path, model_dirs, f"train_file: {a}\ntrain_mixture:\n  - {{path: {a}}}\n")
    with pytest.raises(ConfigError, match="train_file or train_mixture"):
        load_config([], path)
    path = _yaml(tmp_path, model_dirs, f"train_mixture:\n  - {{path: {tmp_path}/nothing*.jsonl}}\n")
    config = load_config([], path).config
    with pytest.raises(ConfigError, match=r"train_mixture\[0\]\.path"):
        prepare_datasets(config, None, None)


def test_curriculum_field_must_be_numeric_in_every_record(tmp_path, model_dirs, tokenizer):
    a, b = _sources(tmp_path)
    config = load_config([], _yaml(tmp_path, model_dirs, f"train_file: {a}\ncurriculum: {{by: difficulty}}\n")).config
    plan = build_order(config, prepare_datasets(config, tokenizer, None))
    first = plan.epoch_order(0)[:4]
    data = prepare_datasets(config, tokenizer, None).train
    assert all(data[int(i)]["line"] % 7 in (1, 2, 3, 4) for i in first)  # difficulty (line-1) % 7 <= 3 at the start
    config = load_config([], _yaml(tmp_path, model_dirs, f"train_file: {b}\ncurriculum: {{by: difficulty}}\n")).config
    with pytest.raises(ConfigError, match=r"curriculum.by = 'difficulty': .*chat.jsonl line 1 has no such field"):
        build_order(config, prepare_datasets(config, tokenizer, None))


def test_mixture_keeps_each_examples_source_and_line(tmp_path, model_dirs, tokenizer):
    config = load_config([], _mixture(tmp_path, model_dirs)).config
    data = prepare_datasets(config, tokenizer, None)
    assert [s.name for s in data.sources] == ["math", "greetings"]
    plan = build_order(config, data)
    rows = [data.train[int(i)] for i in plan.epoch_order(0)]
    assert [r["source_name"] for r in rows].count("math") == 12  # 3:1 of 16
    assert all(r["source_name"] == plan.names[r["source"]] for r in rows)
    assert {r["line"] for r in rows if r["source_name"] == "greetings"} <= set(range(1, 21))


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:  # after the checkpoint of step 3
            raise KeyboardInterrupt("simulated crash")


def _recording(seen):
    class Recording(PaddingCollator):
        def __call__(self, examples):
            seen.append([(e["source_name"], e["line"]) for e in examples])
            return super().__call__(examples)
    return Recording


@pytest.mark.slow
def test_resume_continues_the_mixture_order_exactly(tmp_path, model_dirs, monkeypatch):
    # The collator sees the batches in order (plus one the data loader fetches ahead): compare the first 6.
    straight, before, after = [], [], []
    monkeypatch.setattr(run_module, "PaddingCollator", _recording(straight))
    config = load_config(["--run_name", "a"], _mixture(tmp_path, model_dirs, "log_per_source: true\n")).config
    result = train(config)

    monkeypatch.setattr(run_module, "PaddingCollator", _recording(before))
    original = run_module.install_callbacks
    monkeypatch.setattr(run_module, "install_callbacks", lambda t: (original(t), t.add_callback(_Crash())))
    with pytest.raises(KeyboardInterrupt):
        train(load_config(["--run_name", "b"], _mixture(tmp_path, model_dirs)).config)
    monkeypatch.setattr(run_module, "install_callbacks", original)
    monkeypatch.setattr(run_module, "PaddingCollator", _recording(after))
    train(load_config(["--run_name", "b", "--resume"], _mixture(tmp_path, model_dirs)).config)
    # 3 batches up to the checkpoint, 3 after resuming from it (crossing into epoch 1): the same examples
    assert before[:3] + after[:3] == straight[:6]
    assert straight[:4] != straight[4:8]  # epoch 1 is a new order

    # `nlm data mix` writes exactly the trainer's order
    run_mix(MixOptions(config=str(_mixture(tmp_path, model_dirs)), output=str(tmp_path / "order.jsonl")))
    mixed = [json.loads(line) for line in (tmp_path / "order.jsonl").read_text().splitlines()]
    assert [(r["_source"], r["_line"]) for r in mixed] == [key for batch in straight[:4] for key in batch]

    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    sources = {s["name"]: s for s in metadata["data"]["sources"]}
    assert sources["math"]["weight"] == 3 and sources["greetings"]["weight"] == 1
    assert sum(s["drawn"] for s in sources.values()) == 24  # 6 steps x 4
    assert len(next(iter(sources["math"]["files"].values()))) == 64  # sha256
    logged = [entry for entry in metadata["log_history"] if "task_loss/math" in entry]
    assert logged and all(np.isfinite(entry["task_loss/greetings"]) for entry in logged)


def test_data_mix_writes_records_verbatim_with_their_source(tmp_path, model_dirs, capsys):
    config = _mixture(tmp_path, model_dirs, "curriculum: {by: length, pacing: step}\n")
    output = tmp_path / "order.jsonl"
    assert run_mix(MixOptions(config=str(config), output=str(output), epoch=1)) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 16 and [r["_source"] for r in rows].count("math") == 12
    math = [json.loads(line) for line in (tmp_path / "math.jsonl").read_text().splitlines()]
    for row in rows:
        if row["_source"] == "math":
            assert {k: v for k, v in row.items() if not k.startswith("_")} == math[row["_line"] - 1]
    assert "math: 12" in capsys.readouterr().out
    from nlm.errors import FolderNotOwnedError, RunExistsError

    with pytest.raises(RunExistsError, match="already exists .*pass --overwrite"):
        run_mix(MixOptions(config=str(config), output=str(output)))
    mine = output.with_name("mine.jsonl")
    mine.write_text("the user's\n")
    with pytest.raises(FolderNotOwnedError, match="not written by nlm"):  # never replaced, --overwrite or not
        run_mix(MixOptions(config=str(config), output=str(mine), overwrite=True))
    assert mine.read_text() == "the user's\n"
    from nlm.cli import main

    assert main(["data", "mix", "--config", str(config), "--output", str(output), "--epoch", "1", "--overwrite"]) == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows  # the same order again
    assert main(["data", "mix", "--config", str(config), "--output", str(output), "--epoch", "-1"]) == 2


def test_student_loss_curriculum_scores_once_and_reuses_the_cache(tmp_path, model_dirs, tokenizer, monkeypatch):
    import nlm.distill.scoring as scoring
    from nlm.models.loading import load_causal_lm
    from nlm.training.order import model_scorer

    a, _ = _sources(tmp_path)
    config = load_config([], _yaml(tmp_path, model_dirs, f"train_file: {a}\ncurriculum: {{by: student_loss}}\n")).config
    student = load_causal_lm(str(model_dirs["student"]))
    cache = tmp_path / "cache"
    data = prepare_datasets(config, tokenizer, cache)

    def scorer():
        return model_scorer({"student": student}, {"student": str(model_dirs["student"])}, len(tokenizer), 0, 8, cache)

    plan = build_order(config, data, scorer=scorer())
    losses = scoring.score_examples(data.train, student=student, vocab_width=len(tokenizer))["student_loss"]
    assert np.all(np.diff(losses[plan.ranking[0]]) >= 0)  # easiest (lowest loss) first
    assert len(list((cache / "scores").glob("*.npy"))) == 1
    monkeypatch.setattr(scoring, "score_examples", lambda *a, **k: pytest.fail("scores should come from the cache"))
    again = build_order(config, prepare_datasets(config, tokenizer, cache), scorer=scorer())
    np.testing.assert_array_equal(again.epoch_order(0), plan.epoch_order(0))
    config = load_config([], _yaml(tmp_path, model_dirs, f"train_file: {a}\ncurriculum: {{by: teacher_loss}}\n")).config
    with pytest.raises(ConfigError, match="teacher_loss: needs teacher_model"):
        build_order(config, prepare_datasets(config, tokenizer, cache), scorer=scorer())


@pytest.mark.slow
def test_mixture_holds_out_eval_from_each_source_and_evaluates(tmp_path, model_dirs):
    config = load_config(["--max_steps", "2", "--eval_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "2"],
                         _mixture(tmp_path, model_dirs, "curriculum: {by: length}\n")).config
    result = train(config)
    assert np.isfinite(result.metrics["eval_loss"])
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    assert metadata["data"]["eval_examples"] == 10 + 5  # a quarter of 40 and of 20
    assert metadata["data"]["order"]["curriculum"] is True
