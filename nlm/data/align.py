"""Align two tokenisations of the same text by character spans, for cross-tokenizer distillation.

Teacher and student cut the same completion text into different tokens. A position where *both*
tokenisations may be cut (no token of either side straddles it) is a common cut; the text between two
consecutive common cuts is a group, covered by a run of student tokens and a run of teacher tokens that spell
exactly the same characters. The first token of each group is predicted, on both sides, from the same text
prefix: those two next-token distributions are what cross-tokenizer losses compare.

Why offsets and not decoded strings: byte-level BPE splits a multi-byte character (é, emoji) over several
tokens whose offsets overlap; a cut is only valid where no token straddles it, so a group never splits a
character and never pairs tokens that spell different text (decoding token by token and buffering strings
gets this wrong at exactly those characters). Whitespace a tokenizer leaves out of its offsets (trimmed
leading spaces) is given to the following token, the convention both GPT-2 and SentencePiece encode.

Written by hand: tokenizers gives offsets, but no library aligns two tokenisations this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class Alignment:
    """Groups of one text: for each group, its character span and the index of its first token on each side.

    Indexes are into the token lists given to `align_spans`; `student_end`/`teacher_end` are one past the
    group's last token, so group g covers student tokens `student[g]:student_end[g]`.
    """

    spans: tuple[Span, ...]
    student: tuple[int, ...]
    student_end: tuple[int, ...]
    teacher: tuple[int, ...]
    teacher_end: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.spans)

    def covered_chars(self) -> int:
        return sum(end - start for start, end in self.spans)


def normalise_spans(spans: Sequence[Span], text: str) -> list[Span]:
    """Give uncovered whitespace before a token to that token, and clamp spans into the text.

    Zero-width spans (special tokens) stay zero-width; they are never cut points of their own.
    """
    out: list[Span] = []
    covered_to = 0
    for start, end in spans:
        start, end = max(0, min(start, len(text))), max(0, min(end, len(text)))
        if end > start:
            if start > covered_to and text[covered_to:start].isspace():
                start = covered_to
            covered_to = max(covered_to, end)
        out.append((start, end))
    return out


def _cuts(spans: Sequence[Span], length: int) -> set[int]:
    """Positions where this tokenisation may be cut: every token ends at or before, or starts at or after."""
    candidates = {0, length}
    for start, end in spans:
        if end > start:
            candidates.add(start)
            candidates.add(end)
    straddled: set[int] = set()
    for start, end in spans:
        if end - start > 1:
            straddled.update(p for p in candidates if start < p < end)
    return candidates - straddled


def _first_token_at_or_after(spans: Sequence[Span], position: int, after: int) -> int:
    """Index of the first token (from `after`) with a non-empty span starting at or past `position`."""
    index = after
    while index < len(spans) and (spans[index][1] <= spans[index][0] or spans[index][0] < position):
        index += 1
    return index


def align_spans(student_spans: Sequence[Span], teacher_spans: Sequence[Span], text: str) -> Alignment:
    """Group the two tokenisations of `text` (character spans per token) into common-text groups.

    Every character of `text` belongs to exactly one group, and every group has at least one token on each
    side (a group one side leaves empty — characters it dropped — joins the next group).
    """
    student_spans = normalise_spans(student_spans, text)
    teacher_spans = normalise_spans(teacher_spans, text)
    common = sorted(_cuts(student_spans, len(text)) & _cuts(teacher_spans, len(text)))
    spans: list[Span] = []
    s_first: list[int] = []
    t_first: list[int] = []
    s_next = t_next = 0
    group_start = 0
    for cut in common[1:]:
        s_end = _first_token_at_or_after(student_spans, cut, s_next)
        t_end = _first_token_at_or_after(teacher_spans, cut, t_next)
        if s_end == s_next or t_end == t_next:
            continue  # one side has no token in [group_start, cut): widen the group to the next cut
        spans.append((group_start, cut))
        s_first.append(s_next)
        t_first.append(t_next)
        s_next, t_next, group_start = s_end, t_end, cut
    if spans and group_start < len(text):  # trailing characters no token of one side covers
        spans[-1] = (spans[-1][0], len(text))
    s_end_list = s_first[1:] + [_last_token_end(student_spans)]
    t_end_list = t_first[1:] + [_last_token_end(teacher_spans)]
    return Alignment(tuple(spans), tuple(s_first), tuple(s_end_list[: len(spans)]), tuple(t_first), tuple(t_end_list[: len(spans)]))


def _last_token_end(spans: Sequence[Span]) -> int:
    index = len(spans)
    while index > 0 and spans[index - 1][1] <= spans[index - 1][0]:
        index -= 1
    return index


def token_spans(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    """Token ids of `text` (no special tokens) and each token's character span, from a fast tokenizer."""
    from nlm.errors import ConfigError

    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"distillation.cross_tokenizer needs fast tokenizers (with offset mapping); {type(tokenizer).__name__} is not"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
