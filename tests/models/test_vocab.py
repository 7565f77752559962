import logging

import pytest
import torch

from nlm.errors import VocabularyMismatchError
from nlm.models.scratch import build_causal_lm, build_tokenizer
from nlm.models.vocab import shared_vocab_width
from tests.conftest import CORPUS


def test_same_tokenizer_gives_its_size(tokenizer):
    teacher = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32)
    student = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16)
    assert shared_vocab_width(tokenizer, tokenizer, teacher, student) == len(tokenizer)


def test_padding_rows_are_dropped_and_logged(tokenizer, caplog):
    # As in Qwen2.5 7B vs 0.5B: the teacher's head has extra rows that are no token.
    teacher = build_causal_lm("qwen2", vocab_size=len(tokenizer) + 64, hidden_size=32)
    student = build_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=16)
    with caplog.at_level(logging.INFO):
        assert shared_vocab_width(tokenizer, tokenizer, teacher, student) == len(tokenizer)
    assert "teacher head has" in caplog.text and "64 padding logits are dropped" in caplog.text


def test_different_tokens_at_one_id_is_a_clear_error(tokenizer):
    other = build_tokenizer(["completely different words zebra quantum"] * 30, vocab_size=300)
    model = build_causal_lm("llama", vocab_size=400, hidden_size=16)
    with pytest.raises(VocabularyMismatchError) as info:
        shared_vocab_width(tokenizer, other, model, model)
    message = str(info.value)
    first = next(i for i in range(400) if tokenizer.convert_ids_to_tokens(i) != other.convert_ids_to_tokens(i))
    assert f"id {first} is {tokenizer.convert_ids_to_tokens(first)!r} for the teacher and {other.convert_ids_to_tokens(first)!r}" in message


def test_head_smaller_than_tokenizer_is_an_error(tokenizer):
    small = build_causal_lm("llama", vocab_size=len(tokenizer) - 10, hidden_size=16)
    big = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16)
    with pytest.raises(VocabularyMismatchError, match="student's output head has"):
        shared_vocab_width(tokenizer, tokenizer, big, small)


def test_unused_import_guard():
    assert torch is not None and CORPUS
