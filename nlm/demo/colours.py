"""The demo's synthetic task: each object has a favourite colour, but labels are noisy samples.

Every object (a made-up word) has its own distribution over eight colours, most likely colour at
probability 0.5. A labelled example is one *sample* from that distribution, so a single label often
names a less likely colour. The teacher sees many samples per object and learns each distribution;
the students see only a few. A distilled student receives the teacher's whole distribution at every
answer token, which a one-hot label cannot carry, and so recovers the most likely colour far more often.

Held-out prompts never appear in training (new filler words around the same objects); their
completion is the most likely colour, so exact-match accuracy and per-token loss are plain metrics.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

COLOURS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "plum")
# Shape of every object's colour distribution (assigned to colours in a random order per object).
COLOUR_WEIGHTS = (0.5, 0.18, 0.12, 0.08, 0.05, 0.04, 0.02, 0.01)
FILLERS = (
    "old", "new", "small", "large", "round", "flat", "soft", "hard", "warm", "cold", "bright", "dark",
    "long", "short", "quiet", "loud", "light", "heavy", "clean", "dusty", "tall", "low", "thin", "wide",
)
PLACES = ("table", "door", "window", "shelf", "garden", "river", "road", "wall", "bridge", "tower", "field", "hill")
_SYLLABLES = ("ba", "ko", "ti", "ru", "me", "sa", "lo", "ni", "pe", "da", "zu", "fi", "go", "ve", "ha", "mo")


@dataclass(frozen=True)
class DemoTask:
    objects: tuple[str, ...]
    distributions: dict[str, dict[str, float]]  # object -> colour -> probability

    def most_likely(self, obj: str) -> str:
        return max(self.distributions[obj].items(), key=lambda kv: kv[1])[0]


@dataclass(frozen=True)
class DemoData:
    task: DemoTask
    teacher_train: list[dict]  # the full labelled pool the teacher learns from
    student_train: list[dict]  # a few labelled examples per object (a subset of the pool)
    heldout: list[dict]  # unseen prompts, completion = most likely colour


def build_task(seed: int, num_objects: int = 48) -> DemoTask:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < num_objects:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(3)))
    objects = tuple(sorted(names))
    distributions = {}
    for obj in objects:
        order = list(COLOURS)
        rng.shuffle(order)
        distributions[obj] = dict(zip(order, COLOUR_WEIGHTS, strict=True))
    return DemoTask(objects, distributions)


def _prompt(rng: random.Random, obj: str) -> str:
    return f"the {rng.choice(FILLERS)} {obj} by the {rng.choice(PLACES)} is"


def build_demo_data(seed: int, num_objects: int = 48, pool_per_object: int = 100, labelled_per_object: int = 8,
                    heldout_per_object: int = 8) -> DemoData:
    """Deterministic by `seed`: the same seed gives byte-identical files."""
    task = build_task(seed, num_objects)
    rng = random.Random(seed + 1)
    seen: set[str] = set()
    pool: dict[str, list[dict]] = {obj: [] for obj in task.objects}
    heldout: list[dict] = []
    for obj in task.objects:
        colours, weights = zip(*task.distributions[obj].items(), strict=True)
        while len(pool[obj]) < pool_per_object:
            prompt = _prompt(rng, obj)
            if prompt in seen:
                continue
            seen.add(prompt)
            pool[obj].append({"prompt": prompt, "completion": rng.choices(colours, weights)[0]})
        held = 0
        while held < heldout_per_object:
            prompt = _prompt(rng, obj)
            if prompt in seen:
                continue
            seen.add(prompt)
            heldout.append({"prompt": prompt, "completion": task.most_likely(obj)})
            held += 1
    teacher_train = [row for obj in task.objects for row in pool[obj]]
    student_train = [row for obj in task.objects for row in pool[obj][:labelled_per_object]]
    random.Random(seed + 2).shuffle(teacher_train)
    random.Random(seed + 3).shuffle(student_train)
    return DemoData(task, teacher_train, student_train, heldout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def corpus(data: DemoData) -> list[str]:
    """Texts the demo tokenizer is trained on: every prompt and answer word."""
    words = list(COLOURS) + list(FILLERS) + list(PLACES) + list(data.task.objects)
    return [" ".join(words)] * 4 + [f"{r['prompt']}\n{r['completion']}" for r in data.teacher_train]
