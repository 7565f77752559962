"""Speculative decoding through transformers' assisted generation: greedy output is the target's, counts add up."""

import copy

import pytest
import torch

from nlm.errors import VocabularyMismatchError
from nlm.models.scratch import build_causal_lm, build_tokenizer
from nlm.models.speculative import DraftCounts, assisted_greedy, check_draft_tokenizer, configure_draft
from tests.conftest import CORPUS


@pytest.fixture(scope="module")
def models():
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    target = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=4, seed=1).eval()
    draft = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=2).eval()
    twin = copy.deepcopy(target)  # a draft that always agrees: another module, the target's weights
    for model in (draft, twin):
        configure_draft(model, 4)
    return tokenizer, target, draft, twin


def _greedy(tokenizer, target, draft, text, n=10):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return assisted_greedy(target, draft, ids, n, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)


def test_assisted_greedy_equals_the_target_alone(models):
    tokenizer, target, draft, twin = models
    text = "question: what is two plus"
    alone, counts = _greedy(tokenizer, target, None, text)
    assert len(alone) == 10 and counts.target_forwards == 10 and counts.drafted == 0  # one forward per token
    for helper in (draft, twin):
        assisted, _ = _greedy(tokenizer, target, helper, text)
        assert assisted == alone


def test_counts_of_a_draft_that_always_agrees(models):
    tokenizer, target, _, twin = models
    tokens, counts = _greedy(tokenizer, target, twin, "hello world")
    # 4 candidates per verify step, all accepted, plus the target's own token: 5 new tokens per forward.
    assert counts.new_tokens == len(tokens) == 10
    assert counts.target_forwards == 2
    assert counts.accepted == 8 and counts.drafted == 8
    assert counts.acceptance_rate == 1.0 and counts.tokens_per_target_forward == 5.0


def test_counts_add_and_divide():
    total = DraftCounts()
    total.add(DraftCounts(new_tokens=10, target_forwards=4, drafted=12))
    total.add(DraftCounts(new_tokens=6, target_forwards=4, drafted=8))
    assert (total.accepted, total.acceptance_rate, total.tokens_per_target_forward) == (8, 0.4, 2.0)
    assert DraftCounts().acceptance_rate == 0.0


def test_a_draft_with_another_tokenizer_is_refused_naming_both(models, other_teacher):
    from nlm.models.loading import load_tokenizer

    tokenizer = models[0]
    with pytest.raises(VocabularyMismatchError, match="draft d/ and target t/"):
        check_draft_tokenizer(load_tokenizer(str(other_teacher)), tokenizer, "d/", "t/")
    check_draft_tokenizer(tokenizer, tokenizer, "d/", "t/")
