"""The engine is chosen once from what the teacher declares (`signal_kind`), `loss_impl` and the sharding."""

import pytest
from transformers import AutoModelForCausalLM

from nlm.distill.aligned_teacher import AlignedTeacher
from nlm.distill.engines.aligned import AlignedEngine
from nlm.distill.engines.base import EngineContext
from nlm.distill.engines.choose import choose_engine
from nlm.distill.engines.fused import FusedEngine
from nlm.distill.engines.simple import SimpleEngine
from nlm.distill.objective import Objective, WeightedTerm, shorthand
from nlm.distill.teacher import LiveTeacher
from nlm.errors import ConfigError


@pytest.fixture(scope="module")
def teachers(model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"])
    return LiveTeacher(model, "cpu", len(tokenizer)), AlignedTeacher(model, "cpu", len(tokenizer), tokenizer)


def test_row_teachers_get_the_requested_engine_and_group_teachers_the_aligned_one(teachers):
    live, aligned = teachers
    context = EngineContext(vocab_width=64)
    assert isinstance(choose_engine(live, shorthand(0.5, 2.0), "fused", context)[0], FusedEngine)
    assert isinstance(choose_engine(None, shorthand(0.0, 2.0), "simple", context)[0], SimpleEngine)
    engine, impl = choose_engine(aligned, shorthand(0.5, 2.0), "fused", context)
    assert isinstance(engine, AlignedEngine) and isinstance(engine.plain, FusedEngine) and impl == "fused"


def test_fused_falls_back_to_simple_for_an_unchunkable_term_and_fsdp1(teachers):
    live, _ = teachers
    objective = shorthand(0.5, 2.0)

    class Whole(type(objective.terms[0].term)):
        fused = False

    unchunkable = Objective([WeightedTerm(Whole(), 1.0)])
    assert choose_engine(live, unchunkable, "fused", EngineContext(64))[1] == "simple"
    assert choose_engine(live, objective, "fused", EngineContext(64), fsdp_version=lambda: 1)[1] == "simple"
    assert choose_engine(live, objective, "fused", EngineContext(64), fsdp_version=lambda: 2)[1] == "fused"


def test_a_group_teacher_under_sharded_parameters_is_refused(teachers):
    _, aligned = teachers
    with pytest.raises(ConfigError, match="sharded parameters"):
        choose_engine(aligned, shorthand(0.5, 2.0), "fused", EngineContext(64), sharded=True)
