"""`nlm eval --draft_for`: real tiny models, the assisted outputs equal the target's, usage errors exit 2."""

import json

import pytest

from nlm.apps.draft_eval import draft_prompts, evaluate_draft
from nlm.cli import main
from tests.conftest import write_jsonl


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": "question: what is 3 plus 3?", "completion": "x"}, {"text": "the quick brown"},
            {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]},
            "not json"]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_prompts_of_each_record_format(prompts_file, tokenizer):
    prompts = draft_prompts(prompts_file, tokenizer, "\n")
    assert [line for line, _ in prompts] == [1, 2, 3]
    assert tokenizer.decode(prompts[2][1]) == "<|user|>hello world</s><|assistant|>"  # no assistant turn


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["student", "teacher"])
def test_draft_eval_outputs_equal_the_target_alone(model_dirs, prompts_file, draft):
    result = evaluate_draft(model_dirs[draft], model_dirs["teacher"], prompts_file, max_new_tokens=8,
                            num_assistant_tokens=3)
    assert result["differing_outputs"] == 0 and result["prompts"] == 3
    assert result["new_tokens"] == result["target_forwards"] + result["accepted_tokens"]
    if draft == "teacher":  # the target as its own draft: every candidate is accepted (up to an EOS cut)
        assert result["acceptance_rate"] > 0.9 and result["tokens_per_target_forward"] > 3
    for key in ("target_tokens_per_s", "draft_tokens_per_s", "speculative_tokens_per_s", "speedup"):
        assert result[key] > 0


@pytest.mark.slow
def test_draft_eval_cli_prints_one_json_object(model_dirs, prompts_file, capsys):
    assert main(["eval", "--model", str(model_dirs["student"]), "--draft_for", str(model_dirs["teacher"]),
                 "--data", str(prompts_file), "--max_new_tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["differing_outputs"] == 0 and result["num_assistant_tokens"] == 5


def test_a_draft_with_another_tokenizer_exits_2_naming_both(model_dirs, other_teacher, prompts_file, capsys):
    code = main(["eval", "--model", str(other_teacher), "--draft_for", str(model_dirs["teacher"]),
                 "--data", str(prompts_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"draft {other_teacher} and target {model_dirs['teacher']} have different tokenizers" in err[0]


def test_draft_for_does_not_combine_with_teacher(model_dirs, prompts_file, capsys):
    code = main(["eval", "--model", str(model_dirs["student"]), "--draft_for", str(model_dirs["teacher"]),
                 "--data", str(prompts_file), "--exact_match"])
    assert code == 2 and "does not combine with --teacher or --exact_match" in capsys.readouterr().err
