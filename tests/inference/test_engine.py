"""The batching engine: grouping, truncation per request, stop strings per row."""

import asyncio

from nlm.inference.engine import GenerationEngine, GenerationJob, SamplingKey, cut_at_stop
from nlm.models.loading import load_tokenizer, load_trained_model

GREEDY = SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abcXdefYg", ["Y", "X"]) == ("abc", True)
    assert cut_at_stop("abc", ["Z"]) == ("abc", False)


def test_a_batch_gives_each_request_what_it_would_get_alone(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    engine = GenerationEngine(load_trained_model(model_dirs["student"]), tokenizer, max_batch_size=8, batch_window_ms=50)
    prompts = [tokenizer(p)["input_ids"] for p in ("hello world", "the quick brown fox", "a teacher")]
    alone = [engine._run_group([GenerationJob(ids, 12, GREEDY)])[0].texts[0] for ids in prompts]
    stop = alone[1][2:4] if len(alone[1]) > 4 else None
    jobs = [GenerationJob(prompts[0], 12, GREEDY), GenerationJob(prompts[1], 12, GREEDY, stop=[stop] if stop else []),
            GenerationJob(prompts[2], 5, GREEDY)]
    engine.start()
    try:
        async def run_all():
            return await asyncio.gather(*(engine.generate(job) for job in jobs))

        outputs = asyncio.run(run_all())
    finally:
        engine.stop()
    assert outputs[0].texts[0] == alone[0]
    assert outputs[1].texts[0] == (alone[1][: alone[1].find(stop)] if stop else alone[1])
    short = engine._run_group([GenerationJob(prompts[2], 5, GREEDY)])[0]
    assert outputs[2].texts[0] == short.texts[0] and outputs[2].completion_tokens <= 5
