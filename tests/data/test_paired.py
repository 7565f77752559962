"""The teacher's view of each record under another tokenizer: same student data, aligned positions that
are predicted from the same text on both sides."""

from __future__ import annotations

import json

import pytest

from nlm.data.paired import pair_chat, pair_prompt_completion, pair_text
from nlm.data.tokenize import PaddingCollator, TokenizeSettings, tokenize_records
from nlm.models.scratch import build_tokenizer
from tests.conftest import write_jsonl

CORPUS = [
    "question: what is two plus two? answer: four",
    "héllo wörld 🙂 naïve café, déjà vu",
    "the quick brown fox jumps over the lazy dog",
] * 10


@pytest.fixture(scope="module")
def pair():
    return build_tokenizer(CORPUS, vocab_size=290), build_tokenizer(CORPUS, vocab_size=470)


def _prefix_text(tokenizer, ids, start, end):
    return tokenizer.decode(ids[start:end])


def test_prompt_completion_groups_start_after_the_same_text(pair):
    student, teacher = pair
    prompt, completion = "question: what is 🙂?", " naïve café — déjà vu 42"
    teacher_ids, pairs, teacher_labels = pair_prompt_completion(prompt, completion, "\n", student, teacher)
    s_prompt = len(student(prompt + "\n")["input_ids"])
    t_prompt = len(teacher(prompt + "\n")["input_ids"])
    s_ids = student(prompt + "\n")["input_ids"] + student(completion, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    assert teacher_ids[-1] == teacher.eos_token_id
    assert teacher.decode([i for i in teacher_labels if i != -100], skip_special_tokens=True) == completion
    for s, t, s_end, t_end in pairs[:-1]:
        assert _prefix_text(student, s_ids, s_prompt, s) == _prefix_text(teacher, teacher_ids, t_prompt, t)
        # each group's tokens spell the same text on both sides, and the groups tile the completion
        assert _prefix_text(student, s_ids, s, s_end) == _prefix_text(teacher, teacher_ids, t, t_end) != ""
    assert [group[2:] for group in pairs[:-1]] == [group[:2] for group in pairs[1:]]
    assert pairs[0][:2] == (s_prompt, t_prompt)  # the first completion token on both sides
    assert pairs[-1] == (len(s_ids) - 1, len(teacher_ids) - 1, len(s_ids), len(teacher_ids))  # EOS with EOS
    assert any(s_end - s != t_end - t for s, t, s_end, t_end in pairs)  # the tokenisations really differ


def test_text_records_skip_the_unpredictable_first_group(pair):
    student, teacher = pair
    teacher_ids, pairs, _ = pair_text("the lazy dog 🙂", student, teacher)
    assert all(s > 0 and t > 0 and s_end > s and t_end > t for s, t, s_end, t_end in pairs)
    assert teacher_ids[-1] == teacher.eos_token_id


def test_chat_uses_each_sides_own_template_and_aligns_assistant_content(pair):
    student, teacher = pair
    student.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    teacher = build_tokenizer(CORPUS, vocab_size=470, chat_template="{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]: {% endif %}")
    messages = [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four, déjà vu 🙂"}]
    teacher_ids, pairs, teacher_labels = pair_chat(messages, student, teacher)
    assert teacher.decode([i for i, label in zip(teacher_ids, teacher_labels, strict=True) if label != -100]).strip() == messages[1]["content"]
    s_text = student.apply_chat_template(messages, tokenize=False)
    s_ids = student(s_text, add_special_tokens=False)["input_ids"]
    assert pairs
    content_start_s, content_start_t = pairs[0][:2]
    assert student.decode(s_ids[content_start_s:]).startswith("four")
    assert teacher.decode(teacher_ids[content_start_t:]).strip().startswith("four")
    for s, t, s_end, t_end in pairs:  # the same content text precedes each aligned token on both sides
        assert student.decode(s_ids[content_start_s:s]).strip() == teacher.decode(teacher_ids[content_start_t:t]).strip()
        assert student.decode(s_ids[s:s_end]).strip() == teacher.decode(teacher_ids[t:t_end]).strip() != ""
    assert len(pairs) >= 4  # words, punctuation and the emoji group


def test_tokenize_records_keeps_student_columns_and_adds_aligned_ones(tmp_path, pair):
    student, teacher = pair
    rows = [{"prompt": f"question {i} 🙂", "completion": f" naïve answer {i * 7} café"} for i in range(6)]
    rows += [{"text": "the quick brown fox 🙂"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    settings = TokenizeSettings(max_seq_length=64)
    plain = tokenize_records([path], student, settings).dataset
    paired = tokenize_records([path], student, settings, teacher_tokenizer=teacher).dataset
    assert plain["input_ids"] == paired["input_ids"] and plain["labels"] == paired["labels"]
    for example in paired:
        assert len(example["align_student"]) == len(example["align_teacher"]) == len(example["align_student_end"]) > 0
        for start, end in zip(example["align_student"], example["align_student_end"], strict=True):
            assert all(example["labels"][p] != -100 for p in range(start, end))
    batch = PaddingCollator(0, teacher_pad_token_id=0)([paired[i] for i in range(len(paired))])
    assert batch["teacher_input_ids"].shape[0] == len(paired)
    assert batch["align_student"].shape == batch["align_teacher"].shape
    assert (batch["align_student"] == -1).any() or batch["align_student"].shape[1] == min(len(e["align_student"]) for e in paired)


def test_truncation_drops_pairs_past_either_side(tmp_path, pair):
    student, teacher = pair
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": " naïve café déjà vu " * 6}])
    example = tokenize_records([path], student, TokenizeSettings(max_seq_length=12), teacher_tokenizer=teacher).dataset[0]
    assert len(example["input_ids"]) == 12 and len(example["teacher_input_ids"]) <= 12
    assert all(s < 12 for s in example["align_student"]) and all(t < 12 for t in example["align_teacher"])
    assert all(e <= 12 for e in example["align_student_end"]) and all(e <= len(example["teacher_input_ids"]) for e in example["align_teacher_end"])
    json.dumps(example)  # plain lists of ints
