"""The teacher's own view of a record when its tokenizer differs from the student's.

For each record the teacher reads the same text tokenised by its own tokenizer (its own chat template for
`messages`), and the completion text is aligned between the two tokenisations (`nlm.data.align`). Three
columns join the student's `input_ids`/`labels`:

    teacher_input_ids  the teacher's token ids of the whole example (its BOS, prompt, completion, EOS)
    align_student      positions in `input_ids` of the first token of each aligned group
    align_teacher      positions in `teacher_input_ids` of the first token of the same group
    align_student_end  one past the group's last token in `input_ids` (its tokens: start..end-1)
    align_teacher_end  the same in `teacher_input_ids`
    teacher_labels     the teacher's own targets over the same text (for `nlm eval`: per-byte perplexity)

Group g's first token is predicted at position `align_*[g] - 1` on each side, from the same text prefix: the
two next-token distributions that cross-tokenizer losses compare. The EOS tokens of both sides form one more
group. Only completion (target) text is aligned; other student targets (chat-template scaffolding,
`completion_only_loss: false` prompts) are trained by the CE term alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nlm.data.align import align_spans

PAIRED_COLUMNS = ("teacher_input_ids", "teacher_labels", "align_student", "align_teacher", "align_student_end",
                  "align_teacher_end")
Group = tuple[int, int, int, int]  # student start, teacher start, student end, teacher end


def _with_offsets(tokenizer: Any, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def _pairs(text: str, s_spans: Sequence, t_spans: Sequence, s_base: int, t_base: int) -> list[Group]:
    a = align_spans(s_spans, t_spans, text)
    return [(s_base + s, t_base + t, s_base + se, t_base + te)
            for s, t, se, te in zip(a.student, a.teacher, a.student_end, a.teacher_end, strict=True)]


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def pair_prompt_completion(
    prompt: str, completion: str, separator: str, student: Any, teacher: Any
) -> tuple[list[int], list[Group], list[int]]:
    """Teacher ids, aligned groups (student start, teacher start, student end, teacher end) and teacher labels of a prompt/completion record."""
    s_prompt = student(prompt + separator, add_special_tokens=True)["input_ids"]
    t_prompt = teacher(prompt + separator, add_special_tokens=True)["input_ids"]
    s_ids, s_spans = _with_offsets(student, completion, False)
    t_ids, t_spans = _with_offsets(teacher, completion, False)
    pairs = _pairs(completion, s_spans, t_spans, len(s_prompt), len(t_prompt))
    teacher_ids = list(t_prompt) + t_ids + _eos(teacher)
    if _eos(student) and _eos(teacher):
        s_eos, t_eos = len(s_prompt) + len(s_ids), len(t_prompt) + len(t_ids)
        pairs.append((s_eos, t_eos, s_eos + 1, t_eos + 1))
    labels = [-100] * len(t_prompt) + teacher_ids[len(t_prompt):]
    return teacher_ids, pairs, labels


def pair_text(text: str, student: Any, teacher: Any) -> tuple[list[int], list[Group], list[int]]:
    """A plain-text record: every token is a target; the first group has no prefix to predict it from."""
    s_ids, s_spans = _with_offsets(student, text, True)
    t_ids, t_spans = _with_offsets(teacher, text, True)
    pairs = [group for group in _pairs(text, s_spans, t_spans, 0, 0) if group[0] > 0 and group[1] > 0]
    if _eos(student) and _eos(teacher):
        pairs.append((len(s_ids), len(t_ids), len(s_ids) + 1, len(t_ids) + 1))
    return t_ids + _eos(teacher), pairs, t_ids + _eos(teacher)


def _content_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant message's content in it."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"]:
            continue
        prefix = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        start = rendered.find(message["content"], len(prefix) if rendered.startswith(prefix) else 0)
        if start >= 0:
            spans.append((start, start + len(message["content"])))
    return rendered, spans


def pair_chat(messages: list[dict[str, str]], student: Any, teacher: Any) -> tuple[list[int], list[Group], list[int]]:
    """A conversation rendered by each side's own chat template; each assistant content is aligned."""
    s_text, s_contents = _content_spans(student, messages)
    t_text, t_contents = _content_spans(teacher, messages)
    s_ids, s_spans = _with_offsets(student, s_text, False)
    t_ids, t_spans = _with_offsets(teacher, t_text, False)
    pairs: list[Group] = []
    labels = [-100] * len(t_ids)
    for t_start, t_end in t_contents:
        for i, (a, b) in enumerate(t_spans):
            if b > a and b > t_start and a < t_end:
                labels[i] = t_ids[i]
    for (s_start, s_end), (t_start, t_end) in zip(s_contents, t_contents, strict=False):
        # A token may straddle the content's edge (a template's ": " merged into " four"): it still starts or
        # ends the content, so it is kept with its span clamped to the content.
        s_index = [i for i, (a, b) in enumerate(s_spans) if b > a and b > s_start and a < s_end]
        t_index = [i for i, (a, b) in enumerate(t_spans) if b > a and b > t_start and a < t_end]
        if not s_index or not t_index:
            continue
        content = s_text[s_start:s_end]
        local_s = [(max(s_spans[i][0], s_start) - s_start, min(s_spans[i][1], s_end) - s_start) for i in s_index]
        local_t = [(max(t_spans[i][0], t_start) - t_start, min(t_spans[i][1], t_end) - t_start) for i in t_index]
        pairs += [(s_index[s], t_index[t], s_index[se - 1] + 1, t_index[te - 1] + 1)
                  for s, t, se, te in _pairs(content, local_s, local_t, 0, 0)]
    return t_ids, pairs, labels


def teacher_columns(
    record: dict[str, str], student: Any, teacher: Any, separator: str, labels: Sequence[int], max_length: int
) -> dict[str, list[int]]:
    """The paired columns of one record; groups the truncation (either side) or masks cut into are dropped whole."""
    import json

    if record["format"] == "prompt_completion":
        teacher_ids, pairs, teacher_labels = pair_prompt_completion(record["prompt"], record["completion"], separator, student, teacher)
    elif record["format"] == "text":
        teacher_ids, pairs, teacher_labels = pair_text(record["text"], student, teacher)
    else:
        teacher_ids, pairs, teacher_labels = pair_chat(json.loads(record["messages"]), student, teacher)
    teacher_ids, teacher_labels = teacher_ids[:max_length], teacher_labels[:max_length]
    kept = [(s, t, se, te) for s, t, se, te in pairs
            if 0 < s < se <= len(labels) and all(label != -100 for label in labels[s:se]) and 0 < t < te <= len(teacher_ids)]
    return {
        "teacher_input_ids": teacher_ids,
        "teacher_labels": teacher_labels,
        "align_student": [group[0] for group in kept],
        "align_teacher": [group[1] for group in kept],
        "align_student_end": [group[2] for group in kept],
        "align_teacher_end": [group[3] for group in kept],
    }
