"""Cross-tokenizer alignment: every character in exactly one group, groups spell the same text on both sides."""

from __future__ import annotations

import random

import pytest

from nlm.data.align import align_spans, normalise_spans, token_spans
from nlm.models.scratch import build_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld 🙂 naïve café, déjà vu",
    "line one\nline two\n\n  indented\ttab",
    "answer: 42 — ümlaut Straße 東京 🚀🙂",
] * 10

TEXTS = [
    "héllo wörld 🙂\n  café the lazy dog",
    "  leading spaces and trailing  ",
    "東京 🚀🙂 Straße",
    "a",
    "\n\n\t x",
    "answer: 42 — ümlaut",
]


def _char_level():
    """A tokenizer with no merges: one token per ASCII character, bytes for the rest."""
    return build_tokenizer(CORPUS, vocab_size=1)


@pytest.fixture(scope="module")
def tokenizers():
    return {"small": build_tokenizer(CORPUS, vocab_size=290), "large": build_tokenizer(CORPUS, vocab_size=480), "char": _char_level()}


def _metaspace():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("pair", [("small", "large"), ("large", "char"), ("char", "small"), ("small", "small")])
@pytest.mark.parametrize("text", TEXTS)
def test_groups_cover_every_character_and_spell_the_same_text(tokenizers, pair, text):
    student, teacher = tokenizers[pair[0]], tokenizers[pair[1]]
    s_ids, s_spans = token_spans(student, text)
    t_ids, t_spans = token_spans(teacher, text)
    alignment = align_spans(s_spans, t_spans, text)
    assert alignment.covered_chars() == len(text)  # 100% of the characters
    assert [a for a, _ in alignment.spans] == [0] + [b for _, b in alignment.spans[:-1]]  # contiguous, in order
    for g, (start, end) in enumerate(alignment.spans):
        assert student.decode(s_ids[alignment.student[g] : alignment.student_end[g]]) == text[start:end]
        assert teacher.decode(t_ids[alignment.teacher[g] : alignment.teacher_end[g]]) == text[start:end]
    # every token is in exactly one group on each side
    assert alignment.student[0] == 0 and alignment.student_end[-1] == len(s_ids)
    assert list(alignment.student[1:]) == list(alignment.student_end[:-1])
    assert list(alignment.teacher[1:]) == list(alignment.teacher_end[:-1])


def test_identical_tokenizers_give_one_token_per_group(tokenizers):
    text = "the lazy dog\n  jumps, over"
    ids, spans = token_spans(tokenizers["small"], text)
    alignment = align_spans(spans, spans, text)
    assert len(alignment) == len(ids)
    assert list(alignment.student) == list(alignment.teacher) == list(range(len(ids)))
    # a character split over several byte tokens is never cut: its tokens form one group
    ids, spans = token_spans(tokenizers["char"], "🙂")
    assert len(ids) > 1 and len(align_spans(spans, spans, "🙂")) == 1


def test_byte_level_against_sentencepiece_style_whitespace(tokenizers):
    """Metaspace puts the space inside '▁word', byte-level BPE inside 'Ġword' or a lone 'Ġ': still aligned."""
    sp = _metaspace()
    for text in ("the lazy dog jumps", "  indented line two", "naïve café déjà vu"):
        s_ids, s_spans = token_spans(tokenizers["small"], text)
        t_ids, t_spans = token_spans(sp, text)
        alignment = align_spans(s_spans, t_spans, text)
        assert alignment.covered_chars() == len(text)
        for g, (start, end) in enumerate(alignment.spans):
            assert tokenizers["small"].decode(s_ids[alignment.student[g] : alignment.student_end[g]]) == text[start:end]
        assert len(alignment) >= len(text.split())  # words align on their own, not one group for everything


def test_random_texts_always_fully_aligned(tokenizers):
    rng = random.Random(0)
    alphabet = list("abcdefghij éüß東🙂🚀\n\t.,") + ["  "]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        s_ids, s_spans = token_spans(tokenizers["large"], text)
        t_ids, t_spans = token_spans(tokenizers["char"], text)
        alignment = align_spans(s_spans, t_spans, text)
        assert alignment.covered_chars() == len(text)
        for g, (start, end) in enumerate(alignment.spans):
            assert tokenizers["large"].decode(s_ids[alignment.student[g] : alignment.student_end[g]]) == text[start:end]
            assert tokenizers["char"].decode(t_ids[alignment.teacher[g] : alignment.teacher_end[g]]) == text[start:end]


def test_normalise_spans_gives_trimmed_whitespace_to_the_next_token():
    assert normalise_spans([(0, 3), (5, 8)], "abc  def") == [(0, 3), (3, 8)]
    assert normalise_spans([(0, 0), (0, 3)], "abc") == [(0, 0), (0, 3)]  # a zero-width special token stays
