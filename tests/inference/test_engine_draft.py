"""The engine with a draft model: greedy outputs equal the engine without it, alone and in a concurrent batch."""

import copy

import pytest

from nlm.inference.engine import GenerationEngine, GenerationJob, SamplingKey
from nlm.models.scratch import build_causal_lm, build_tokenizer
from tests.conftest import CORPUS
from tests.inference.test_engine import _run

GREEDY = SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)
SAMPLED = SamplingKey(True, 0.8, 1.0, 0, 1.0, 1)
PROMPTS = ("hello world", "the quick brown fox jumps", "a teacher", "question: what is it")


@pytest.fixture(scope="module")
def models():
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    target = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=48, num_layers=3, seed=5).eval()
    weak = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, seed=6).eval()
    return tokenizer, target, weak, copy.deepcopy(target)


def _outputs(tokenizer, target, draft, jobs, stagger):
    seen = []
    engine = GenerationEngine(target, tokenizer, max_batch_size=8, draft=draft, num_assistant_tokens=3,
                              observe_draft=seen.append)
    engine.eos_ids = set()  # every request runs its whole budget: the longest comparison
    return [(o.texts, o.completion_tokens) for o in _run(engine, jobs(), stagger=stagger)], seen


@pytest.mark.parametrize("stagger", [pytest.param(0.0, marks=pytest.mark.slow), 0.05])
def test_drafted_greedy_outputs_equal_the_engine_without_a_draft(models, stagger):
    tokenizer, target, weak, twin = models

    def jobs():
        ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        return [GenerationJob(p, 12 + 2 * i, GREEDY) for i, p in enumerate(ids)]

    plain, none_seen = _outputs(tokenizer, target, None, jobs, stagger)
    assert none_seen == []
    for draft in (weak, twin):
        drafted, seen = _outputs(tokenizer, target, draft, jobs, stagger)
        assert drafted == plain
        assert seen, "the last request alone in the batch is drafted"
    assert sum(c.accepted for c in seen) > 0  # the twin agrees with the target: its tokens are accepted


def test_a_lone_request_is_drafted_and_counted(models):
    tokenizer, target, _, twin = models
    ids = tokenizer("hello world")["input_ids"]
    plain, _ = _outputs(tokenizer, target, None, lambda: [GenerationJob(ids, 16, GREEDY)], 0)
    drafted, seen = _outputs(tokenizer, target, twin, lambda: [GenerationJob(ids, 16, GREEDY)], 0)
    assert drafted == plain
    assert len(seen) == 1 and seen[0].new_tokens == 16 and seen[0].target_forwards == 4  # 3 drafted + 1 each


def test_sampled_requests_are_not_drafted(models):
    tokenizer, target, _, twin = models
    ids = tokenizer("hello world")["input_ids"]
    _, seen = _outputs(tokenizer, target, twin, lambda: [GenerationJob(ids, 6, SAMPLED, seed=1)], 0)
    assert seen == []


def test_a_draft_with_another_tokenizer_is_refused_naming_both(model_dirs, other_teacher):
    from nlm.errors import VocabularyMismatchError
    from nlm.inference.model_registry import load_served_models
    from nlm.inference.settings import ServerSettings

    settings = ServerSettings(model=model_dirs["student"], draft=other_teacher, device="cpu")
    with pytest.raises(VocabularyMismatchError, match=f"draft {other_teacher} and target {model_dirs['student']}"):
        load_served_models(settings)
