import json

import pytest

from nlm.data.tokenize import IGNORE_INDEX, PaddingCollator, TokenizeSettings, encode_chat, tokenize_records
from nlm.errors import DataError
from nlm.models.scratch import build_tokenizer
from tests.conftest import CORPUS, write_jsonl


def _ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_prompt_completion_labels_token_by_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello world", "completion": "the quick fox"}])
    data = tokenize_records([path], tokenizer, TokenizeSettings())
    example = data.dataset[0]
    prompt = _ids(tokenizer, "hello world\n", special=True)
    completion = _ids(tokenizer, "the quick fox") + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert data.stats.target_tokens == len(completion)


def test_completion_only_off_trains_on_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "completion": "world"}])
    example = tokenize_records([path], tokenizer, TokenizeSettings(completion_only_loss=False)).dataset[0]
    assert example["labels"] == example["input_ids"]


def test_separator_is_configurable(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "completion": "world"}])
    example = tokenize_records([path], tokenizer, TokenizeSettings(prompt_separator=" => ")).dataset[0]
    assert example["input_ids"][: len(_ids(tokenizer, "hello => "))] == _ids(tokenizer, "hello => ")


def test_text_records_are_all_targets_with_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    example = tokenize_records([path], tokenizer, TokenizeSettings()).dataset[0]
    expected = _ids(tokenizer, "hello world") + [tokenizer.eos_token_id]
    assert example["input_ids"] == expected and example["labels"] == expected


def test_chat_masks_everything_but_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "the fox"},
    ]
    ids, labels = encode_chat(tokenizer, messages, TokenizeSettings())
    targets = [token for token, label in zip(ids, labels, strict=False) if label != IGNORE_INDEX]
    expected = _ids(tokenizer, "world</s>") + _ids(tokenizer, "the fox</s>")
    assert targets == expected
    # Position by position: every labelled token is the same token as the input at that position.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=False))
    assert tokenizer.decode([t for t, lab in zip(ids, labels, strict=False) if lab == IGNORE_INDEX]).count("<|assistant|>") == 2


def test_chat_without_template_is_a_clear_error(tmp_path):
    bare = build_tokenizer(CORPUS, vocab_size=300, chat_template=None)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="chat.jsonl: records with 'messages' need a tokenizer with a chat template"):
        tokenize_records([path], bare, TokenizeSettings())


def test_mixed_formats_in_one_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "completion": "b"}, {"text": "c"},
        {"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]},
    ])
    data = tokenize_records([path], tokenizer, TokenizeSettings())
    assert len(data.dataset) == 3 and data.stats.read["formats"] == {"prompt_completion": 1, "text": 1, "chat": 1}


def test_truncation_is_counted_and_prompt_only_examples_dropped(tmp_path, tokenizer):
    long_completion = " ".join(["the quick brown fox"] * 20)
    long_prompt = " ".join(["hello world"] * 40)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hello", "completion": long_completion},
        {"prompt": long_prompt, "completion": "fox"},
        {"prompt": "hello", "completion": "fox"},
    ])
    data = tokenize_records([path], tokenizer, TokenizeSettings(max_seq_length=16))
    assert data.stats.truncated == 2
    assert data.stats.dropped_no_target == 1
    assert len(data.dataset) == 2
    assert all(len(row) <= 16 for row in data.dataset["input_ids"])


def test_cache_is_reused_and_keyed_by_content_and_settings(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    cache = tmp_path / "cache"
    first = tokenize_records([path], tokenizer, TokenizeSettings(), cache)
    second = tokenize_records([path], tokenizer, TokenizeSettings(), cache)
    assert not first.cache_hit and second.cache_hit
    assert second.dataset["input_ids"] == first.dataset["input_ids"] and second.stats == first.stats
    assert not tokenize_records([path], tokenizer, TokenizeSettings(max_seq_length=64), cache).cache_hit
    write_jsonl(path, [{"prompt": "a", "completion": "changed"}])
    assert not tokenize_records([path], tokenizer, TokenizeSettings(), cache).cache_hit


def test_collator_pads_right_with_masks(tokenizer):
    batch = PaddingCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_inspect_json_reports_counts(tmp_path, tokenizer, capsys):
    from nlm.cli import main

    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, "oops", {"text": "hello world"}])
    assert main(["data", "inspect", str(path), "--json", "--tokenizer", str(tokenizer_dir), "--max_seq_length", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lines"] == 3 and report["valid"] == 2 and report["skipped"] == {"invalid_json": 1}
    assert report["formats"] == {"prompt_completion": 1, "text": 1}
    assert report["tokens"]["max"] >= report["tokens"]["p50"] and "would_truncate" in report
    assert main(["data", "inspect", str(path)]) == 0
    assert "skipped: 1" in capsys.readouterr().out
