"""Several teachers: the mixture in log space, weights, routing by record, metadata and the cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nlm.distill.objective import DistillationTerm
from nlm.distill.targets import MixtureLogits
from nlm.distill.teacher import EnsembleTeacher, LiveTeacher
from nlm.models.scratch import build_causal_lm
from tests.conftest import write_jsonl

VOCAB = 300


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("teacher2") / "teacher2"
    build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=48, num_layers=3, seed=7).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _live(folder):
    return LiveTeacher(AutoModelForCausalLM.from_pretrained(folder), "cpu", VOCAB)


def _batch(seed=0, b=3, s=9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=generator)
    mask = torch.rand(b, s - 1, generator=generator) > 0.3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, mask


def _kd_sum(teacher, inputs, mask, student, temperature=2.0):
    term = DistillationTerm("forward_kl", temperature)
    return term.row_sum(student, teacher.signal(inputs, mask, torch.device("cpu")).all_rows(), None)


def test_one_teacher_ensemble_equals_the_teacher_bit_for_bit(model_dirs):
    live = _live(model_dirs["teacher"])
    inputs, mask = _batch()
    student = torch.randn(int(mask.sum()), VOCAB)
    alone, ensemble = _kd_sum(live, inputs, mask, student), _kd_sum(EnsembleTeacher([live], [3.0]), inputs, mask, student)
    assert torch.equal(alone, ensemble)


def test_weights_one_and_zero_equal_the_first_teacher_alone(model_dirs, second_teacher):
    first, second = _live(model_dirs["teacher"]), _live(second_teacher)
    inputs, mask = _batch(1)
    student = torch.randn(int(mask.sum()), VOCAB)
    assert torch.equal(_kd_sum(first, inputs, mask, student), _kd_sum(EnsembleTeacher([first, second], [1.0, 0.0]), inputs, mask, student))
    assert not torch.equal(_kd_sum(first, inputs, mask, student), _kd_sum(EnsembleTeacher([first, second], [0.5, 0.5]), inputs, mask, student))


def test_the_log_space_mixture_equals_a_hand_computation(model_dirs, second_teacher):
    first, second = _live(model_dirs["teacher"]), _live(second_teacher)
    inputs, mask = _batch(2)
    n, tau = int(mask.sum()), 1.7
    student = torch.randn(n, VOCAB)
    ensemble = EnsembleTeacher([first, second], [1.0, 3.0])
    rows = ensemble.signal(inputs, mask, torch.device("cpu")).all_rows()
    assert isinstance(rows, MixtureLogits) and rows.weights == [0.25, 0.75]
    with torch.no_grad():
        z1 = first.model(inputs["input_ids"]).logits[:, :-1][mask].double()
        z2 = second.model(inputs["input_ids"]).logits[:, :-1][mask].double()
    p = 0.25 * torch.softmax(z1 / tau, -1) + 0.75 * torch.softmax(z2 / tau, -1)
    q = torch.softmax(student.double() / tau, -1)
    expected = (p * (p / q).log()).sum()
    found = DistillationTerm("forward_kl", tau).row_sum(student, rows, None)
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-5)
    # and chunk by chunk, as the fused engine asks for rows
    signal = ensemble.signal(inputs, mask, torch.device("cpu"))
    chunked = sum(DistillationTerm("forward_kl", tau).row_sum(student[s:s + 4], signal.rows(s, min(s + 4, n)), None) for s in range(0, n, 4))
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-5, atol=1e-5)


def test_route_sends_each_example_to_its_teacher(model_dirs, second_teacher):
    first, second = _live(model_dirs["teacher"]), _live(second_teacher)
    inputs, mask = _batch(3, b=4)
    inputs["teacher"] = torch.tensor([1, 0, 1, 0])
    routed = EnsembleTeacher([first, second], [1.0, 1.0], mixture="route")
    signal = routed.signal(inputs, mask, torch.device("cpu"))
    with torch.no_grad():
        by_teacher = [first.model(inputs["input_ids"]).logits, second.model(inputs["input_ids"]).logits]
    expected = torch.cat([by_teacher[int(t)][b, :-1][mask[b]] for b, t in enumerate(inputs["teacher"])])
    torch.testing.assert_close(signal.all_rows(), expected, rtol=1e-4, atol=1e-5)
    n = signal.count
    chunks = torch.cat([signal.rows(s, min(s + 5, n)) for s in range(0, n, 5)])  # chunk edges inside examples
    torch.testing.assert_close(chunks, expected, rtol=1e-4, atol=1e-5)


def test_route_reads_the_teacher_field_of_each_record(tmp_path, tokenizer):
    from nlm.data.tokenize import PaddingCollator, TokenizeSettings, tokenize_records
    from nlm.errors import DataError

    rows = [{"prompt": f"q {i}", "completion": f"a {i}", "teacher": "math" if i % 2 else "chat"} for i in range(6)]
    rows.insert(2, {"text": "plain text row", "teacher": "math"})
    path = write_jsonl(tmp_path / "routed.jsonl", rows)
    settings = TokenizeSettings(route_teachers=("chat", "math"))
    data = tokenize_records([path], tokenizer, settings).dataset
    assert data["teacher"] == [0, 1, 1, 0, 1, 0, 1]  # file order
    assert PaddingCollator(0)([data[0], data[1]])["teacher"].tolist() == [0, 1]
    assert "teacher" not in tokenize_records([path], tokenizer, TokenizeSettings()).dataset.column_names
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "teacher": "poetry"}])
    with pytest.raises(DataError, match="bad.jsonl line 1: the record has teacher 'poetry'.*one of chat, math"):
        tokenize_records([tmp_path / "bad.jsonl"], tokenizer, settings)


def _config(model_dirs, second_teacher, data, out, *extra):
    from nlm.config.sources import load_config

    teachers = json.dumps([{"model": str(model_dirs["teacher"]), "weight": 2.0, "name": "chat"},
                           {"model": str(second_teacher), "weight": 1.0, "name": "math"}])
    return load_config(["--teachers", teachers, "--student_model", str(model_dirs["student"]), "--train_file", str(data),
                        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                        "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", *extra]).config


def test_teachers_and_teacher_model_exclude_each_other(model_dirs):
    from nlm.config.sources import load_config
    from nlm.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_model or teachers, not both"):
        load_config(["--teacher_model", "x", "--teachers", json.dumps([{"model": "y"}])])


@pytest.mark.slow
def test_two_teacher_runs_record_every_teacher(model_dirs, second_teacher, tmp_path):
    from nlm.apps.train import train

    rows = [{"prompt": f"question: what is {i} plus {i}?", "completion": f"answer: {2 * i}", "teacher": ("chat", "math")[i % 2]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    for mixture in ("average", "route"):
        result = train(_config(model_dirs, second_teacher, data, tmp_path / mixture, "--distillation.teacher_mixture", mixture,
                               "--eval_file", str(data)))
        metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
        assert metadata["teacher"]["teacher_mixture"] == mixture
        assert [(t["model"], t["weight"]) for t in metadata["teacher"]["teachers"]] == [
            (str(model_dirs["teacher"]), 2.0), (str(second_teacher), 1.0)]
        assert result.metrics["eval_teacher_kl"] > 0
        assert all(e["distill_loss"] > 0 for e in metadata["log_history"] if "distill_loss" in e)


@pytest.mark.slow
def test_one_teacher_in_teachers_trains_exactly_like_teacher_model(model_dirs, pc_file, tmp_path):
    from safetensors.torch import load_file

    from nlm.apps.train import train
    from nlm.config.sources import load_config

    common = ["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--per_device_train_batch_size", "4",
              "--learning_rate", "1e-3", "--max_steps", "3", "--save_strategy", "no"]
    one = train(load_config([*common, "--teacher_model", str(model_dirs["teacher"]), "--output_dir", str(tmp_path / "a")]).config)
    listed = train(load_config([*common, "--teachers", json.dumps([{"model": str(model_dirs["teacher"]), "weight": 0.3}]),
                                "--output_dir", str(tmp_path / "b")]).config)
    a, b = load_file(str(one.final_dir / "model.safetensors")), load_file(str(listed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_cache_stores_the_mixture_and_fingerprints_every_teacher(model_dirs, second_teacher, pc_file, tmp_path):
    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.data.prepare import tokenize_settings
    from nlm.data.tokenize import PaddingCollator, tokenize_records
    from nlm.distill.cache import TeacherCache
    from nlm.distill.targets import target_logp

    config = _config(model_dirs, second_teacher, pc_file, tmp_path / "unused")
    manifest = build_teacher_cache(config, tmp_path / "cache", top_k=8, shard_examples=10)
    assert [t["model"] for t in manifest["fingerprint"]["teachers"]] == [str(model_dirs["teacher"]), str(second_teacher)]
    assert len(manifest["teacher_weights"]) == 2 and manifest["fingerprint"]["teacher_mixture"] == "average"
    data = tokenize_records([pc_file], load_tokenizer_for(model_dirs), tokenize_settings(config)).dataset
    batch = PaddingCollator(0)([data[3]])
    mask = batch["labels"][:, 1:] != -100
    ensemble = EnsembleTeacher([_live(model_dirs["teacher"]), _live(second_teacher)], [2.0, 1.0])
    expected = target_logp(ensemble.signal(batch, mask, torch.device("cpu")).all_rows(), 2.0).topk(8, -1)
    cached = TeacherCache(tmp_path / "cache").targets([3])
    assert torch.equal(cached.ids, expected.indices)
    # Stored as fp16 rounded down (never up, so the top-k mass never exceeds the teacher's): within one fp16 step below.
    rounded = expected.values.to(torch.float16)
    step = (rounded.float() - torch.nextafter(rounded, torch.full_like(rounded, float("-inf"))).float()).abs()
    below = expected.values - cached.logp.float()
    assert (below >= -1e-4).all() and (below <= step + 1e-4).all()


def load_tokenizer_for(model_dirs):
    from nlm.models.loading import load_tokenizer

    return load_tokenizer(str(model_dirs["teacher"]))


def test_route_falls_back_to_the_data_source_name(model_dirs, second_teacher):
    first, second = _live(model_dirs["teacher"]), _live(second_teacher)
    inputs, mask = _batch(4, b=3)
    inputs["teacher"] = torch.tensor([-1, 1, -1])  # the middle record named its teacher; the others did not
    inputs["source_name"] = ["math", "chat", "chat"]
    routed = EnsembleTeacher([first, second], [1.0, 1.0], mixture="route", names=["chat", "math"])
    with torch.no_grad():
        by_teacher = [first.model(inputs["input_ids"]).logits, second.model(inputs["input_ids"]).logits]
    expected = torch.cat([by_teacher[t][b, :-1][mask[b]] for b, t in enumerate([1, 1, 0])])
    torch.testing.assert_close(routed.signal(inputs, mask, torch.device("cpu")).all_rows(), expected, rtol=1e-4, atol=1e-5)
    inputs["source_name"] = ["poetry", "chat", "chat"]
    with pytest.raises(ValueError, match="data source 'poetry' is not one of the teachers' names"):
        routed.signal(inputs, mask, torch.device("cpu"))
