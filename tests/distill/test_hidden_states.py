"""Layer-wise distillation: the hidden-state term, the layer map, pruned students and their training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from nlm.distill.hidden_states import HiddenShapes, HiddenStatesTerm, auto_layer_map
from nlm.errors import ConfigError, RunExistsError
from nlm.models.prune import choose_layers, init_student


def test_auto_map_spreads_student_layers_over_the_teacher():
    assert auto_layer_map(2, 4) == {0: 1, 1: 3}
    assert auto_layer_map(3, 12) == {0: 3, 1: 7, 2: 11}
    assert auto_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}


def test_mse_and_cosine_equal_a_hand_computation():
    torch.manual_seed(0)
    term = HiddenStatesTerm({0: 1, 1: 3}, "mse", 8, 8)
    assert len(term.projections) == 0  # equal widths: compared directly
    student = {0: torch.randn(5, 8), 1: torch.randn(5, 8)}
    teacher = {1: torch.randn(5, 8), 3: torch.randn(5, 8)}
    # mse is relative to each teacher row's square norm (issue 24: scale-free), re-pinned from the raw MSE
    expected = ((((student[0] - teacher[1]) ** 2).sum(-1) / teacher[1].pow(2).sum(-1)).sum()
                + (((student[1] - teacher[3]) ** 2).sum(-1) / teacher[3].pow(2).sum(-1)).sum()) / 2
    torch.testing.assert_close(term.batch_sum(student, teacher), expected)
    cosine = HiddenStatesTerm({0: 1}, "cosine", 8, 8)
    torch.testing.assert_close(cosine.batch_sum(student, teacher), (1 - F.cosine_similarity(student[0], teacher[1], dim=-1)).sum())
    assert cosine.batch_sum({0: teacher[1] * 3}, teacher).abs() < 1e-5  # scale-free, zero on aligned states


def test_mse_is_scale_free_and_one_for_a_zero_student():
    torch.manual_seed(0)
    term = HiddenStatesTerm({0: 0}, "mse", 8, 8)
    student, teacher = {0: torch.randn(6, 8)}, {0: torch.randn(6, 8) * 3 + 1}
    scaled = term.batch_sum({0: student[0] * 1000}, {0: teacher[0] * 1000})
    torch.testing.assert_close(scaled, term.batch_sum(student, teacher))  # a residual stream of any magnitude
    torch.testing.assert_close(term.batch_sum({0: torch.zeros(6, 8)}, teacher), torch.tensor(6.0))  # 1 per row
    assert term.batch_sum(teacher, teacher) == 0


def test_auto_map_sends_each_kept_layer_to_the_teacher_layer_it_stands_for():
    # kept teacher layers 0, 1, 23: student 0 is teacher 0 (next kept is 1) -> 0; student 1 stands for 1..22 -> 22;
    # the last stands for 23..29 -> 29
    assert auto_layer_map(3, 30, (0, 1, 23)) == {0: 0, 1: 22, 2: 29}
    assert auto_layer_map(6, 30, (0, 5, 10, 15, 20, 25)) == auto_layer_map(6, 30)  # an even cut: the same map
    assert auto_layer_map(2, 4, (0, 7)) == auto_layer_map(2, 4)  # kept layers from another teacher: ignored


def test_different_widths_get_a_trainable_projection():
    term = HiddenStatesTerm({0: 0}, "mse", 4, 6)
    student, teacher = {0: torch.randn(3, 4, requires_grad=True)}, {0: torch.randn(3, 6)}
    loss = term.batch_sum(student, teacher)
    loss.backward()
    weight = term.projections["0"].weight
    assert weight.shape == (6, 4) and weight.grad is not None and student[0].grad is not None
    assert term.parameters() == [weight]


def test_layer_map_is_checked_against_the_models():
    from nlm.config.settings import HiddenStatesConfig

    shapes = HiddenShapes(student_layers=2, student_width=32, teacher_layers=4, teacher_width=64)
    with pytest.raises(ValueError, match="teacher layer 4 is outside 0..3"):
        HiddenStatesTerm.from_config(HiddenStatesConfig(weight=1, layers={0: 4}), shapes)
    with pytest.raises(ValueError, match="student layer 2 is outside 0..1"):
        HiddenStatesTerm.from_config(HiddenStatesConfig(weight=1, layers={2: 0}), shapes)
    assert HiddenStatesTerm.from_config(HiddenStatesConfig(weight=1), shapes).layers == {0: 1, 1: 3}


def test_choose_layers():
    assert choose_layers(12, keep_every=4) == [0, 4, 8, 11]
    assert choose_layers(4, layers=[3, 0, 0]) == [0, 3]
    with pytest.raises(ConfigError, match="the teacher has layers 0..3"):
        choose_layers(4, layers=[0, 4])
    with pytest.raises(ConfigError, match="exactly one"):
        choose_layers(4)


def test_init_student_writes_a_pruned_model_that_loads_cleanly(model_dirs, tmp_path):
    from nlm.commands.init_student import Options, run

    out = tmp_path / "pruned"
    assert run(Options(teacher=str(model_dirs["teacher"]), layers="0,3", output=str(out))) == 0
    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"])
    assert student.config.num_hidden_layers == 2
    kept = {0: 0, 1: 3}
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        source = name
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            source = f"{prefix}.layers.{kept[int(index)]}.{tail}"
        assert torch.equal(tensor, teacher_state[source]), name
    ids = torch.randint(0, 300, (1, 6))
    assert student(ids).logits.shape == (1, 6, teacher.config.vocab_size)
    # generation with a KV cache walks the kept layers by their new indices
    student.generate(ids, max_new_tokens=3, do_sample=False)
    with pytest.raises(RunExistsError, match="already holds a student"):
        init_student(str(model_dirs["teacher"]), out, keep_every=2)
    (out / "notes.md").write_text("why these layers")  # a user's file in the output survives --overwrite
    assert init_student(str(model_dirs["teacher"]), out, keep_every=2, overwrite=True)["layers"] == [0, 2, 3]
    assert (out / "notes.md").read_text() == "why these layers"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # not written by nlm: never replaced, even with --overwrite
    with pytest.raises(RunExistsError, match="not created by nlm"):
        init_student(str(model_dirs["teacher"]), mine, keep_every=2, overwrite=True)
    assert (mine / "config.json").read_text() == "{}"
    config = json.loads((out / "config.json").read_text())
    assert (config["nlm_kept_layers"], config["nlm_teacher_num_layers"]) == ([0, 2, 3], 4)


def test_block_influence_equals_one_minus_cos_of_consecutive_hidden_states(model_dirs, pc_file):
    """The hook-measured influence of each inner layer equals 1 - cos(hidden_states[l], hidden_states[l+1]) from
    transformers' own outputs (the last one is after the final norm there, so it is left out)."""
    from nlm.models.importance import block_influence, sample_batches
    from nlm.models.loading import load_tokenizer

    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"]).eval()
    batches = sample_batches(pc_file, load_tokenizer(str(model_dirs["teacher"])), samples=10, max_seq_length=64, batch_size=4)
    influence = block_influence(teacher, batches)
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            states = teacher(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].bool()
            for layer in range(3):
                sums[layer] += (1 - F.cosine_similarity(states[layer][mask], states[layer + 1][mask], dim=-1)).double().sum()
            count += int(mask.sum())
    torch.testing.assert_close(torch.tensor(influence[:3], dtype=torch.float64), sums / count, rtol=1e-4, atol=1e-6)
    assert len(influence) == 4 and all(0 <= value <= 2 for value in influence)


def test_init_student_by_importance_keeps_the_most_influential_layers(model_dirs, pc_file, tmp_path):
    from nlm.models.importance import even_layers, important_layers

    assert important_layers([0.1, 0.5, 0.05, 0.3], 2) == [1, 3]
    assert even_layers(30, 6) == [0, 5, 10, 15, 20, 25] and even_layers(4, 4) == [0, 1, 2, 3]
    report = init_student(str(model_dirs["teacher"]), tmp_path / "s", num_layers=2, by="importance", data=pc_file)
    assert report["layers"] == important_layers(report["influence"], 2)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["nlm_kept_layers"] == report["layers"]
    with pytest.raises(ConfigError, match="pass --data FILE"):
        init_student(str(model_dirs["teacher"]), tmp_path / "t", num_layers=2, by="importance")
    with pytest.raises(ConfigError, match="exactly one"):
        init_student(str(model_dirs["teacher"]), tmp_path / "t", num_layers=2, layers=[0])


@pytest.mark.slow
def test_hidden_state_run_saves_projections_apart_and_final_loads_plainly(model_dirs, pc_file, tmp_path):
    from safetensors.torch import load_file

    from nlm.apps.train import train
    from nlm.config.sources import load_config

    base = ["--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
            "--train_file", str(pc_file), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
            "--distillation.hidden_states.weight", "0.5", "--distillation.hidden_states.layers", '{"0": 1, "1": 3}']
    for extra in ([], ["--loss_impl", "simple"], ["--lora.enabled", "true", "--gradient_checkpointing", "true"]):
        name = "-".join(extra) or "fused"
        result = train(load_config([*base, *extra, "--output_dir", str(tmp_path / name)]).config)
        projections = load_file(str(result.final_dir / "distill_projections.safetensors"))
        assert {k: tuple(v.shape) for k, v in projections.items()} == {"0.weight": (64, 32), "1.weight": (64, 32)}
        metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
        logged = [e for e in metadata["log_history"] if "hidden_states_loss" in e]
        assert logged and all(e["hidden_states_loss"] > 0 for e in logged)
        if not extra or extra[0] != "--lora.enabled":
            _, info = AutoModelForCausalLM.from_pretrained(result.final_dir, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]


def test_init_student_through_the_cli(model_dirs, tmp_path, capsys):
    from nlm.cli import main

    assert main(["init-student", "--teacher", str(model_dirs["teacher"]), "--keep_every", "3", "--output", str(tmp_path / "s")]) == 0
    assert "keeps teacher layers 0,3 of 4" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 2
    assert main(["init-student", "--teacher", str(model_dirs["teacher"]), "--layers", "0,x", "--output", str(tmp_path / "t")]) == 2
    assert "comma-separated layer numbers" in capsys.readouterr().err
    assert main(["init-student", "--teacher", str(model_dirs["teacher"]), "--layers", "0,9", "--output", str(tmp_path / "u")]) == 2
    assert "the teacher has layers 0..3" in capsys.readouterr().err


def test_layers_auto_follows_the_kept_layers_of_an_init_student_student(model_dirs, pc_file, tmp_path):
    """The map a run (and a teacher cache) uses for `layers: auto` reads the kept layers from the student's config."""
    from nlm.apps.teacher_cache import cached_hidden_layers
    from nlm.config.settings import TrainingConfig

    init_student(str(model_dirs["teacher"]), tmp_path / "s", layers=[0, 1])
    config = TrainingConfig(student_model=str(tmp_path / "s"), teacher_model=str(model_dirs["teacher"]), train_file=str(pc_file),
                            distillation={"hidden_states": {"weight": 1.0, "layers": "auto"}})
    assert cached_hidden_layers(config, teacher_layers=4, teacher_width=64) == (0, 3)  # evenly spread it would be (1, 3)
    config.student_model = str(model_dirs["student"])  # no kept layers recorded: spread evenly
    assert cached_hidden_layers(config, teacher_layers=4, teacher_width=64) == (1, 3)
