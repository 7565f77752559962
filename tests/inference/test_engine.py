"""The continuous batching engine: equal to transformers' generate, per-request results in a shared batch."""

import asyncio

import pytest
import torch

from nlm.inference.engine import (
    GenerationEngine,
    GenerationJob,
    LogprobSpec,
    SamplingKey,
    ScoringJob,
    ScoringTooLarge,
    context_length,
    cut_at_stop,
    eos_token_ids,
)
from nlm.models.loading import load_tokenizer, load_trained_model
from nlm.models.scratch import build_causal_lm

GREEDY = SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abcXdefYg", ["Y", "X"]) == ("abc", True)
    assert cut_at_stop("abc", ["Z"]) == ("abc", False)


def _run(engine, jobs, stagger=0.0):
    async def go():
        async def later(job, delay):
            await asyncio.sleep(delay)
            return await engine.generate(job)

        return await asyncio.gather(*(later(job, stagger * i) for i, job in enumerate(jobs)))

    engine.start()
    try:
        return asyncio.run(go())
    finally:
        engine.stop()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_staggered_batch_equals_transformers_generate(model_dirs, arch):
    """Requests that join a running batch at different steps get exactly what `generate` gives each alone."""
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    model = build_causal_lm(arch, vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=3, max_positions=64).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("hello world", "the quick brown fox jumps", "a teacher", "question: what is it")]
    expected = []
    for ids in prompts:
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    engine = GenerationEngine(model, tokenizer, max_batch_size=8)
    engine.eos_ids = set()  # generate above ran without EOS too: both produce exactly 10 tokens
    outputs = _run(engine, [GenerationJob(ids, 10 - i, GREEDY) for i, ids in enumerate(prompts)], stagger=0.02)
    for i, (output, text) in enumerate(zip(outputs, expected, strict=True)):
        assert output.completion_tokens == 10 - i
        assert text.startswith(output.texts[0])


def test_a_batch_gives_each_request_what_it_would_get_alone(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    model = load_trained_model(model_dirs["student"])
    prompts = [tokenizer(p)["input_ids"] for p in ("hello world", "the quick brown fox", "a teacher")]
    alone = [_run(GenerationEngine(model, tokenizer), [GenerationJob(ids, 12, GREEDY)])[0].texts[0] for ids in prompts]
    stop = alone[1][2:4] if len(alone[1]) > 4 else None
    jobs = [GenerationJob(prompts[0], 12, GREEDY), GenerationJob(prompts[1], 12, GREEDY, stop=[stop] if stop else []),
            GenerationJob(prompts[2], 5, GREEDY)]
    outputs = _run(GenerationEngine(model, tokenizer, max_batch_size=8), jobs)
    assert outputs[0].texts[0] == alone[0]
    assert outputs[1].texts[0] == (alone[1][: alone[1].find(stop)] if stop else alone[1])
    short = _run(GenerationEngine(model, tokenizer), [GenerationJob(prompts[2], 5, GREEDY)])[0]
    assert outputs[2].texts[0] == short.texts[0] and outputs[2].completion_tokens <= 5


def test_seeded_sampling_has_its_own_generator(model_dirs):
    """A seed reproduces one request's samples whatever else runs, and never reseeds the global RNG."""
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    model = load_trained_model(model_dirs["student"])
    sampled = SamplingKey(True, 1.3, 0.95, 40, 1.1, 2)
    ids = tokenizer("hello")["input_ids"]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    alone = _run(GenerationEngine(model, tokenizer), [GenerationJob(ids, 8, sampled, seed=9)])[0]
    assert torch.equal(torch.rand(3), before), "the global RNG was reseeded or consumed"
    crowd = [GenerationJob(ids, 8, sampled) for _ in range(3)] + [GenerationJob(ids, 8, sampled, seed=9)]
    together = _run(GenerationEngine(model, tokenizer, max_batch_size=16), crowd)
    assert together[-1].texts == alone.texts and len(alone.texts) == 2


def test_cancelled_jobs_leave_the_batch(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    engine = GenerationEngine(load_trained_model(model_dirs["student"]), tokenizer, max_batch_size=4)
    engine.eos_ids = set()
    ids = tokenizer("hello")["input_ids"]

    async def go():
        long = asyncio.ensure_future(engine.generate(GenerationJob(ids, 400, GREEDY)))
        await asyncio.sleep(0.2)
        long.cancel()
        await asyncio.sleep(0.3)
        return len(engine._rows), await engine.generate(GenerationJob(ids, 3, GREEDY))

    engine.start()
    try:
        rows, short = asyncio.run(go())
    finally:
        engine.stop()
    assert rows == 0 and short.completion_tokens == 3


def test_eos_ids_and_context_come_from_the_model(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    model = load_trained_model(model_dirs["student"])
    model.generation_config.eos_token_id = [3, 17, 42]
    assert {3, 17, 42} <= eos_token_ids(model, tokenizer)
    assert context_length(build_causal_lm("gpt2", vocab_size=50, max_positions=96).config) == 96


def _score(engine, prompts, spec):
    async def go():
        return await engine.score(ScoringJob(prompts, spec))

    engine.start()
    try:
        return asyncio.run(go())
    finally:
        engine.stop()


def _unchunked_scores(model, prompts, pad_id, top, temperature, vocab):
    """What scoring computed before it was chunked: one padded forward, whole [rows, width-1, vocab] log-softmax."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab].float() / temperature, -1)
    out = []
    for row, prompt in enumerate(prompts):
        rows, targets = logp[row, : len(prompt) - 1], ids[row, 1: len(prompt)]
        picked = rows.gather(1, targets.unsqueeze(1))
        best = rows.topk(top, dim=-1)
        out.append((picked.squeeze(1), (rows > picked).sum(-1) + 1, best.indices, best.values))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("from_hidden", [True, False])
def test_chunked_scoring_equals_unchunked(model_dirs, arch, from_hidden):
    """A chunk budget of 3 positions (several chunks per prompt, chunks across prompts) gives the scores of the
    whole-logits computation, through the head-apart path and the whole-logits path alike."""
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    model = build_causal_lm(arch, vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=4, max_positions=64).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("the quick brown fox jumps over", "a teacher", "question: what is it")]
    prompts.append(prompts[0][:1])  # one token: nothing to score
    engine = GenerationEngine(model, tokenizer, max_batch_size=8)
    engine.score_chunk = 3
    engine._head_apart = from_hidden
    spec = LogprobSpec(prompt=5, temperature=0.7)
    scores = _score(engine, prompts, spec)
    expected = _unchunked_scores(model, prompts, engine.pad_id, 5, 0.7, len(tokenizer))
    assert [len(s.token_logprobs) for s in scores] == [len(p) - 1 for p in prompts]
    for got, (picked, ranks, top_ids, top_values) in zip(scores, expected, strict=True):
        torch.testing.assert_close(got.token_logprobs, picked, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.top_logprobs, top_values, atol=1e-6, rtol=0)
        assert got.ranks.tolist() == ranks.tolist() and got.top_ids.tolist() == top_ids.tolist()


def test_the_head_runs_apart_only_when_it_reproduces_the_logits(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=4).eval()
    engine = GenerationEngine(model, tokenizer)
    _score(engine, [[5, 6, 7]], LogprobSpec(prompt=1))
    assert engine._head_apart is True
    forward = model.forward

    def scaled(*args, **kwargs):  # logits post-processed after the head, as soft-capping does
        out = forward(*args, **kwargs)
        out["logits"] = out.logits * 2
        return out

    model.forward = scaled
    capped = GenerationEngine(model, tokenizer)
    _score(capped, [[5, 6, 7]], LogprobSpec(prompt=1))
    assert capped._head_apart is False


def test_scoring_out_of_memory_is_scoring_too_large_naming_the_prompts(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    engine = GenerationEngine(load_trained_model(model_dirs["student"]), tokenizer)

    def exhausted(prompts, job):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    engine._score_rows = exhausted
    with pytest.raises(ScoringTooLarge, match="3 prompt"):
        _score(engine, [[5, 6], [7, 8, 9], [10]], LogprobSpec(prompt=2))
