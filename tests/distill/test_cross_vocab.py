"""ULD and hybrid divergences across vocabularies: properties, the identical-tokenizer case, gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlm.distill.cross_vocab import build_vocab_map, hybrid, token_bytes, uld
from nlm.distill.divergences import forward_kl
from nlm.models.scratch import build_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld 🙂 naïve café", "line one\nline two"] * 10


def test_uld_is_zero_for_the_same_distribution_and_ignores_vocabulary_order():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    assert torch.allclose(uld(logits, logits), torch.zeros(5), atol=1e-6)
    assert torch.allclose(uld(logits, logits[:, torch.randperm(40)]), torch.zeros(5), atol=1e-6)


def test_uld_compares_vocabularies_of_different_sizes():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 30), torch.randn(4, 70)
    value = uld(student, teacher, temperature=2.0)
    assert value.shape == (4,) and (value > 0).all() and (value <= 2 + 1e-6).all()
    # padding with impossible tokens changes nothing: ULD depends only on the sorted probabilities
    padded = torch.cat([teacher, torch.full((4, 10), -1e9)], dim=1)
    assert torch.allclose(uld(student, padded, 2.0), value, atol=1e-6)


def test_hybrid_with_identical_tokenizers_equals_forward_kl():
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    size = len(tokenizer)
    vocab = build_vocab_map(tokenizer, tokenizer, size, size)
    assert vocab.matched == size
    torch.manual_seed(0)
    student, teacher = torch.randn(6, size), torch.randn(6, size) * 3
    tau = 2.0
    expected = forward_kl(F.log_softmax(teacher / tau, -1), F.log_softmax(student / tau, -1))
    assert torch.allclose(hybrid(student, teacher, vocab, tau), expected, atol=1e-6)


def test_vocab_map_matches_tokens_spelling_the_same_bytes():
    small, large = build_tokenizer(CORPUS, vocab_size=280), build_tokenizer(CORPUS, vocab_size=400)
    vocab = build_vocab_map(large, small, len(large), len(small))
    t_bytes, s_bytes = token_bytes(large), token_bytes(small)
    assert 0 < vocab.matched < len(large)
    for t, s in zip(vocab.teacher_ids.tolist(), vocab.student_ids.tolist(), strict=True):
        if t in t_bytes:
            assert t_bytes[t] == s_bytes[s]
        else:  # a special token matched by name
            assert large.convert_ids_to_tokens(t) == small.convert_ids_to_tokens(s)
    assert len(set(vocab.student_ids.tolist())) == vocab.matched  # one to one


def test_hybrid_gradient_reaches_the_student_only_and_mixes_both_parts():
    small, large = build_tokenizer(CORPUS, vocab_size=280), build_tokenizer(CORPUS, vocab_size=400)
    vocab = build_vocab_map(large, small, len(large), len(small))
    torch.manual_seed(0)
    student = torch.randn(3, len(small), requires_grad=True)
    teacher = torch.randn(3, len(large), requires_grad=False)
    matched_only = hybrid(student, teacher, vocab, 1.0, matched_weight=1.0, unmatched_weight=0.0)
    both = hybrid(student, teacher, vocab, 1.0, matched_weight=1.0, unmatched_weight=1.0)
    assert (both > matched_only).all()  # the unmatched mass adds a positive ULD term
    both.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_hybrid_compares_groups_spelled_by_several_tokens_with_uld_only():
    """A group that one side spells with several tokens starts with a *piece* on that side: no token-for-token
    match there, only ULD over the whole distributions (weighted like the unmatched part)."""
    student_tok = build_tokenizer(CORPUS, vocab_size=290)
    teacher_tok = build_tokenizer(CORPUS, vocab_size=420)
    vocab = build_vocab_map(teacher_tok, student_tok, len(teacher_tok), len(student_tok))
    torch.manual_seed(0)
    student, teacher = torch.randn(6, len(student_tok)), torch.randn(6, len(teacher_tok)) * 3
    single = torch.tensor([True, False, True, False, False, True])
    got = hybrid(student, teacher, vocab, 2.0, 1.0, 0.7, one_to_one=single)
    assert torch.allclose(got[single], hybrid(student, teacher, vocab, 2.0, 1.0, 0.7)[single], atol=1e-6)
    assert torch.allclose(got[~single], 0.7 * uld(student, teacher, 2.0)[~single], atol=1e-6)
