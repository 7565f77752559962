"""The demo's built-in tasks, by name (`nlm demo --task NAME`), each with its data, tokenizer corpus and budget.

A task's budget (model sizes, label budget, steps) is fixed here, not per seed or per run: the demo compares
methods on the same budget. A task with `on_policy_lmbda` also trains an on-policy student
(`distillation.lmbda`) next to the off-policy one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class DemoBudget:
    """Model sizes and steps; `quick` is the same pipeline with fewer steps, for tests."""

    teacher_layers: int = 4
    teacher_hidden: int = 128
    student_layers: int = 2
    student_hidden: int = 64
    teacher_epochs: float = 4.0
    student_epochs: float = 30.0
    teacher_lr: float = 2e-3
    student_lr: float = 2e-3
    batch_size: int = 32

    @classmethod
    def quick(cls) -> DemoBudget:
        return cls(teacher_epochs=1.0, student_epochs=2.0, teacher_hidden=64, teacher_layers=2, student_hidden=32)


@dataclass(frozen=True)
class DemoTaskSpec:
    name: str
    description: str
    build_data: Callable[[int], Any]  # seed -> object with teacher_train, student_train, heldout (lists of records)
    corpus: Callable[[Any], list[str]]  # data -> texts the demo tokenizer is trained on
    budget: DemoBudget = field(default_factory=DemoBudget)
    quick_budget: DemoBudget = field(default_factory=DemoBudget.quick)
    eval_max_new_tokens: int = 4
    # On-policy student: its `distillation` settings (lmbda, max_new_tokens, ...); None = no on-policy student.
    on_policy: dict[str, Any] | None = None


def _colours() -> DemoTaskSpec:
    from nlm.demo.colours import build_demo_data, corpus

    return DemoTaskSpec("colours", "noisy one-word colour labels (the default)", build_demo_data, corpus)


# Fixed before any on-policy/off-policy comparison was run (see docs/BENCHMARKS.md): same model sizes as the
# colour task, 200 labelled words for the students, 4000 for the teacher.
REVERSE_BUDGET = DemoBudget(teacher_epochs=8.0, student_epochs=40.0)
REVERSE_ON_POLICY = {"lmbda": 0.5, "max_new_tokens": 8}


def _reverse() -> DemoTaskSpec:
    from nlm.demo.reverse import build_reverse_data, reverse_corpus

    return DemoTaskSpec("reverse", "spell a made-up word backwards (multi-token answers)", build_reverse_data,
                        reverse_corpus, budget=REVERSE_BUDGET,
                        quick_budget=replace(DemoBudget.quick(), teacher_epochs=1.0, student_epochs=2.0),
                        eval_max_new_tokens=8, on_policy=REVERSE_ON_POLICY)


TASKS: dict[str, Callable[[], DemoTaskSpec]] = {"colours": _colours, "reverse": _reverse}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> DemoTaskSpec:
    from nlm.errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"--task {name!r}: expected one of {', '.join(TASK_NAMES)}")
    return TASKS[name]()
