"""The `reverse` demo task: spell a made-up word backwards, letter by letter (multi-token answers).

A prompt spells a word of 3-5 letters, `reverse: k a t o`; the completion is the same letters in reverse
order, `o t a k`. The answer is several tokens long and each one is chosen after the ones before it, so
an early wrong letter puts the model in a state its training text never showed (exposure bias). The
teacher learns the rule from many labelled words; the students get a small labelled budget. Off-policy
distillation only ever shows the student correct prefixes; on-policy distillation (`distillation.lmbda`)
lets the teacher score the student's own attempts, including the prefixes it gets wrong.

Held-out words never appear in any training file, so exact match measures the rule, not memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LETTERS = tuple("abdegikmoprstu")
MIN_LETTERS, MAX_LETTERS = 3, 5


@dataclass(frozen=True)
class ReverseData:
    teacher_train: list[dict]  # the full labelled pool the teacher learns from
    student_train: list[dict]  # the students' labelled budget (a subset of the pool)
    heldout: list[dict]  # unseen words, completion = the word reversed


def reverse_example(word: str) -> dict:
    return {"prompt": "reverse: " + " ".join(word), "completion": " ".join(reversed(word))}


def build_reverse_data(seed: int, pool: int = 4000, labelled: int = 200, heldout: int = 300) -> ReverseData:
    """Deterministic by `seed`: distinct words, split into pool (teacher), labelled subset (students), held-out."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < pool + heldout:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    teacher_train = [reverse_example(w) for w in words[:pool]]
    return ReverseData(teacher_train, teacher_train[:labelled], [reverse_example(w) for w in words[pool:]])


def reverse_corpus(data: ReverseData) -> list[str]:
    """Texts the demo tokenizer is trained on: every letter with and without a leading space."""
    return [" ".join(LETTERS), "".join(f"{c}\n" for c in LETTERS)] * 4 + [
        f"{r['prompt']}\n{r['completion']}" for r in data.teacher_train]
