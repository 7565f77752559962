"""`nlm data select`: one scoring pass, exactly the requested count, only pool records, verbatim."""

import json

import numpy as np
import pytest
import torch

from nlm.commands.data_select import Options, run
from nlm.data.select import selection_size, top_indices
from nlm.distill.scoring import score_examples
from nlm.errors import ConfigError
from nlm.models.loading import load_causal_lm
from tests.conftest import write_jsonl


def _pool(tmp_path, with_completion=True):
    rows = []
    for i in range(30):
        row = {"prompt": f"question: what is {i} plus {i}?", "id": i}
        if with_completion:
            row["completion"] = f"answer: {2 * i}"
        rows.append(row)
    return write_jsonl(tmp_path / "pool.jsonl", rows)


def test_select_keeps_exactly_count_records_from_the_pool_verbatim(tmp_path, model_dirs):
    pool = _pool(tmp_path)
    out, scores = tmp_path / "selected.jsonl", tmp_path / "scores.jsonl"
    assert run(Options(teacher=str(model_dirs["teacher"]), student=str(model_dirs["student"]), data=str(pool),
                       output=str(out), count=7, scores=str(scores), by="teacher_student_kl")) == 0
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in pool.read_text().splitlines()]
    assert len(selected) == 7 and len({r["id"] for r in selected}) == 7
    assert all(r in originals for r in selected)
    table = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(table) == 30 and sum(r["selected"] for r in table) == 7
    # the selected are the 7 highest scores
    best = sorted(table, key=lambda r: -r["score"])[:7]
    assert {r["line"] for r in best} == {r["id"] + 1 for r in selected}
    assert all(r["score"] == r["teacher_student_kl"] and 0 <= r["disagreement"] <= 1 for r in table)
    from nlm.errors import FolderNotOwnedError, RunExistsError

    with pytest.raises(RunExistsError, match="already exists .*pass --overwrite"):
        run(Options(teacher=str(model_dirs["teacher"]), student=str(model_dirs["student"]), data=str(pool),
                    output=str(out), fraction=0.5))
    mine = tmp_path / "mine.jsonl"
    mine.write_text("the user's\n")
    with pytest.raises(FolderNotOwnedError, match="not written by nlm"):  # --overwrite replaces only nlm's output
        run(Options(teacher=str(model_dirs["teacher"]), student=str(model_dirs["student"]), data=str(pool),
                    output=str(out), scores=str(mine), fraction=0.5, overwrite=True))
    assert mine.read_text() == "the user's\n"


@pytest.mark.slow
def test_prompt_only_pool_is_scored_on_the_students_greedy_answer(tmp_path, model_dirs):
    pool = _pool(tmp_path, with_completion=False)
    out, scores = tmp_path / "selected.jsonl", tmp_path / "scores.jsonl"
    run(Options(teacher=str(model_dirs["teacher"]), student=str(model_dirs["student"]), data=str(pool),
                output=str(out), fraction=0.2, scores=str(scores), max_new_tokens=4, diverse=True))
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(selected) == 6 and all("completion" not in r for r in selected)
    assert all("student_answer" in json.loads(line) for line in scores.read_text().splitlines())


def test_scores_match_a_direct_computation(model_dirs, tokenizer):
    teacher = load_causal_lm(str(model_dirs["teacher"]))
    student = load_causal_lm(str(model_dirs["student"]))
    ids = tokenizer("hello world, distillation makes small models strong")["input_ids"]
    example = {"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
    short = {"input_ids": ids[:6], "labels": [-100] * 3 + ids[3:6]}
    scores = score_examples([example, short], student=student, teacher=teacher, vocab_width=len(tokenizer), batch_size=2)
    with torch.no_grad():
        t = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, 2:-1, : len(tokenizer)], -1)
        s = torch.log_softmax(student(torch.tensor([ids])).logits[0, 2:-1, : len(tokenizer)], -1)
    kl = (t.exp() * (t - s)).sum(-1).mean().item()
    np.testing.assert_allclose(scores["teacher_student_kl"][0], kl, rtol=1e-4)
    np.testing.assert_allclose(scores["disagreement"][0], (t.argmax(-1) != s.argmax(-1)).double().mean().item())
    targets = torch.tensor(ids[3:])
    np.testing.assert_allclose(scores["student_loss"][0], -s.gather(1, targets[:, None]).mean().item(), rtol=1e-4)
    assert scores["tokens"].tolist() == [len(ids) - 3, 3]


def test_selection_sizes_and_diversity():
    assert selection_size(100, 0.3, None) == 30
    assert selection_size(100, None, 7) == 7
    with pytest.raises(ConfigError, match="--count"):
        selection_size(5, None, 7)
    with pytest.raises(ConfigError, match="exactly one"):
        selection_size(5, 0.5, 2)
    texts = ["the red fox runs far", "the red fox runs far away", "a blue bird sings"]
    assert top_indices(np.array([3.0, 2.0, 1.0]), 2) == [0, 1]
    assert top_indices(np.array([3.0, 2.0, 1.0]), 2, texts) == [0, 2]  # the near-duplicate is passed over
    assert top_indices(np.array([3.0, 2.0, 1.0]), 3, texts) == [0, 2, 1]  # ... and taken last when needed


def test_cli_needs_exactly_one_of_fraction_or_count(tmp_path, capsys):
    from nlm.cli import main

    base = ["data", "select", "--teacher", "t", "--student", "s", "--data", str(_pool(tmp_path)), "--output", str(tmp_path / "o")]
    assert main(base) == 2
    assert main([*base, "--count", "3", "--fraction", "0.5"]) == 2
    assert "exactly one of --fraction or --count" in capsys.readouterr().err
    assert main([*base, "--count", "3", "--by", "loudness"]) == 2
    assert "--by" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
