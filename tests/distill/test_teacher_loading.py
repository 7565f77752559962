"""Teacher construction in one place: each kind a module (selects/load) listed once; every teacher class
implements the protocol, capabilities included."""

import typing

import pytest
from transformers import AutoModelForCausalLM

from nlm.config.settings import TeacherSpec, TrainingConfig
from nlm.distill.aligned_teacher import AlignedTeacher
from nlm.distill.teacher import EnsembleTeacher, LiveTeacher, Teacher
from nlm.distill.teacher_loading import TEACHER_KINDS, kind_module, teacher_kinds


@pytest.mark.parametrize("kind", list(TEACHER_KINDS))
def test_each_kind_module_selects_and_loads(kind):
    module = kind_module(kind)
    assert module.__doc__ and callable(module.selects) and callable(module.load)


@pytest.mark.parametrize("fields, kinds", [
    ({}, []),
    ({"teacher_model": "t"}, ["live"]),
    ({"teacher_model": "t", "distillation": {"cross_tokenizer": "uld"}}, ["cross_tokenizer", "live"]),
    ({"teachers": [TeacherSpec(model="a"), TeacherSpec(model="b")]}, ["ensemble"]),
    ({"teacher_model": "t", "teacher_cache": "c", "distillation": {"cross_tokenizer": "alm"}}, ["cache", "live"]),
])
def test_the_kind_follows_todays_keys_in_precedence_order(fields, kinds):
    assert teacher_kinds(TrainingConfig(**fields)) == kinds


def test_every_teacher_class_declares_the_protocol(model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"])
    live = LiveTeacher(model, "cpu", len(tokenizer))
    teachers = [live, EnsembleTeacher([live], [1.0]), AlignedTeacher(model, "cpu", len(tokenizer), tokenizer)]
    members = [name for name in dir(Teacher) if not name.startswith("_")] + list(typing.get_type_hints(Teacher))
    for teacher in teachers:
        assert isinstance(teacher, Teacher)
        assert all(hasattr(teacher, name) for name in members), type(teacher).__name__
    assert [t.signal_kind for t in teachers] == ["rows", "rows", "groups"]
    assert live.live_model is model and teachers[1].live_model is None
