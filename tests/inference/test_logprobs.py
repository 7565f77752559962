"""Log-probabilities from the served model equal log_softmax of the same model run locally (in-process app)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from nlm.inference.app import create_app
from nlm.inference.settings import ServerSettings
from nlm.models.vocab import vocabulary_fingerprint
from tests.inference.conftest import wait_ready


@pytest.fixture(scope="module")
def scored(model_dirs):
    settings = ServerSettings(model=model_dirs["student"], max_new_tokens_cap=32, max_prompt_tokens=64, max_logprobs=8,
                              request_timeout_s=30)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def local(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).eval()
    return model, AutoTokenizer.from_pretrained(model_dirs["student"])


def _local_logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [s, V]


def test_echo_and_prompt_logprobs_equal_local_log_softmax(scored, local):
    model, tokenizer = local
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 5, "prompt_logprobs": 5,
            "return_tokens_as_token_ids": True}
    with ThreadPoolExecutor(4) as pool:  # other requests in flight through the same batcher
        others = [pool.submit(scored.post, "/v1/completions", json={"prompt": "a dog", "max_tokens": 8, "temperature": 0})
                  for _ in range(3)]
        reply = scored.post("/v1/completions", json=body)
        assert all(o.result().status_code == 200 for o in others)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    logp = _local_logp(model, ids)
    legacy = choice["logprobs"]
    assert legacy["tokens"] == [f"token_id:{t}" for t in ids]
    assert legacy["token_logprobs"][0] is None and legacy["top_logprobs"][0] is None
    for position in range(1, len(ids)):
        row = logp[position - 1]
        assert legacy["token_logprobs"][position] == pytest.approx(float(row[ids[position]]), abs=1e-5)
        top = row.topk(5)
        assert [int(k.removeprefix("token_id:")) for k in legacy["top_logprobs"][position]] == top.indices.tolist()
        assert list(legacy["top_logprobs"][position].values()) == pytest.approx(top.values.tolist(), abs=1e-5)
        entry = choice["prompt_logprobs"][position]  # vLLM's shape: keyed by token id, the prompt token included
        assert entry[str(ids[position])]["logprob"] == pytest.approx(float(row[ids[position]]), abs=1e-5)
        assert entry[str(ids[position])]["rank"] == int((row > row[ids[position]]).sum()) + 1
        ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])[:5]
        assert [int(k) for k, _ in ranked] == top.indices.tolist()
    assert choice["prompt_logprobs"][0] is None and choice["prompt_token_ids"] == ids


def test_generated_token_logprobs_equal_local_log_softmax(scored, local):
    model, tokenizer = local
    reply = scored.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 6, "temperature": 0, "logprobs": 3,
                                                 "return_tokens_as_token_ids": True})
    assert reply.status_code == 200, reply.text
    legacy = reply.json()["choices"][0]["logprobs"]
    generated = [int(t.removeprefix("token_id:")) for t in legacy["tokens"]]
    prompt = tokenizer("the cat")["input_ids"]
    logp = _local_logp(model, prompt + generated)
    for step, token in enumerate(generated):
        row = logp[len(prompt) + step - 1]
        assert legacy["token_logprobs"][step] == pytest.approx(float(row[token]), abs=1e-5)
        assert token == int(row.argmax())  # greedy: the most likely token was chosen
        assert list(legacy["top_logprobs"][step].values()) == pytest.approx(row.topk(3).values.tolist(), abs=1e-5)


def test_sampling_settings_do_not_change_the_logprobs(scored, local):
    model, tokenizer = local
    reply = scored.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 1, "temperature": 1.7, "top_p": 0.5,
                                                 "logprobs": 2, "seed": 3, "return_tokens_as_token_ids": True})
    legacy = reply.json()["choices"][0]["logprobs"]
    token = int(legacy["tokens"][0].removeprefix("token_id:"))
    row = _local_logp(model, tokenizer("the cat")["input_ids"])[-1]
    assert legacy["token_logprobs"][0] == pytest.approx(float(row[token]), abs=1e-5)


def test_logprobs_temperature_extension(scored, local):
    model, tokenizer = local
    ids = tokenizer("the cat sat")["input_ids"]
    reply = scored.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "prompt_logprobs": 4, "logprobs_temperature": 2.0})
    entry = reply.json()["choices"][0]["prompt_logprobs"][1]
    with torch.no_grad():
        row = torch.log_softmax(model(torch.tensor([ids])).logits[0, 0].float() / 2.0, -1)
    assert entry[str(ids[1])]["logprob"] == pytest.approx(float(row[ids[1]]), abs=1e-5)


def test_chat_logprobs_in_openai_shape(scored):
    reply = scored.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                      "temperature": 0, "logprobs": True, "top_logprobs": 2})
    if reply.status_code == 400:  # the tiny tokenizer has no chat template
        pytest.skip(reply.json()["error"]["message"])
    content = reply.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(item["top_logprobs"]) == 2 and item["logprob"] <= 0 for item in content)


@pytest.mark.parametrize("prompt", ["Hello", [5, 6, 7]])
def test_echo_alone_with_max_tokens_0_echoes_the_prompt(scored, local, prompt):
    """No log-probs asked: nothing to score, the prompt comes back as it is (a regression gave 500 here)."""
    reply = scored.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["text"] == (prompt if isinstance(prompt, str) else local[1].decode(prompt))
    assert choice.get("logprobs") is None and reply.json()["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "logprobs": 9}, "logprobs"),
    ({"prompt": "a", "prompt_logprobs": 9, "max_tokens": 0}, "prompt_logprobs"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [0, 100000], "max_tokens": 0, "echo": True}, "prompt"),
    ({"prompt": [5, 6], "max_tokens": 0, "echo": True, "logprobs": 2, "nlm_format": "arrays"}, "nlm_format"),
    ({"prompt": [5, 6], "max_tokens": 1, "prompt_logprobs": 2, "nlm_format": "arrays"}, "nlm_format"),
    ({"prompt": [5, 6], "max_tokens": 0, "prompt_logprobs": 2, "nlm_format": "arrays", "n": 2}, "nlm_format"),
])
def test_refusals_name_the_field(scored, body, field):
    reply = scored.post("/v1/completions", json=body)
    assert reply.status_code == 422 and reply.json()["error"]["field"] == field
    if "logprobs" in field:
        assert "cap of 8" in reply.json()["error"]["message"]
    if field == "nlm_format":  # this server runs --engine nlm: the message must not say otherwise
        assert "engine" not in reply.json()["error"]["message"]


def test_scoring_out_of_memory_is_a_413_naming_the_prompts(scored, monkeypatch):
    """Deterministic for the request, so a client status that the served teacher does not retry."""
    from nlm.distill.served_teacher import RETRIED_STATUS

    engine = next(iter(scored.app.state.nlm.engines.values()))

    def exhausted(prompts, job):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    monkeypatch.setattr(engine, "_score_rows", exhausted)
    reply = scored.post("/v1/completions", json={"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 0, "prompt_logprobs": 2,
                                                 "nlm_format": "arrays"})
    assert reply.status_code == 413 and 413 not in RETRIED_STATUS
    assert "2 prompt(s)" in reply.json()["error"]["message"] and reply.json()["error"]["field"] == "prompt"


def test_models_publish_the_tokenizer_fingerprint(scored, local):
    entry = scored.get("/v1/models").json()["data"][0]
    assert entry["tokenizer_fingerprint"] == vocabulary_fingerprint(local[1])
    assert entry["vocab_size"] == len(local[1]) and entry["max_logprobs"] == 8 and entry["max_batch_size"] == 32
    assert entry["logprobs_temperature"] is True  # --engine nlm takes it; --engine vllm's card says false
    assert entry["nlm_format"] == ["arrays"]  # declared, so the served teacher need not infer it
    from nlm.inference.logprobs import model_card

    vllm_card = model_card(local[1], ServerSettings(engine="vllm"))
    assert vllm_card["nlm_format"] == [] and vllm_card["logprobs_temperature"] is False


def test_a_list_of_token_prompts_gets_one_choice_each_equal_to_alone(scored):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    body = {"max_tokens": 1, "temperature": 0, "prompt_logprobs": 3}
    batch = scored.post("/v1/completions", json={**body, "prompt": prompts}).json()["choices"]
    assert [choice["index"] for choice in batch] == [0, 1, 2]
    for prompt, choice in zip(prompts, batch, strict=True):
        alone = scored.post("/v1/completions", json={**body, "prompt": prompt}).json()["choices"][0]
        assert choice["prompt_token_ids"] == prompt
        for a, b in zip(alone["prompt_logprobs"][1:], choice["prompt_logprobs"][1:], strict=True):
            assert a.keys() == b.keys()
            assert [v["logprob"] for v in a.values()] == pytest.approx([v["logprob"] for v in b.values()], abs=1e-5)


def test_scoring_arrays_equal_local_log_softmax_and_the_vllm_shape(scored, local):
    """max_tokens 0 with a list of token-id prompts: one forward pass; nlm_format "arrays" holds the same numbers
    as vLLM's shape, and both are the local model's log_softmax of each prompt alone."""
    model, _ = local
    prompts = [[5, 6, 7, 8, 9], [9, 10, 11], [12, 13]]
    body = {"prompt": prompts, "max_tokens": 0, "prompt_logprobs": 4}
    arrays = scored.post("/v1/completions", json={**body, "nlm_format": "arrays"})
    shaped = scored.post("/v1/completions", json=body)
    assert arrays.status_code == 200 and shaped.status_code == 200, arrays.text + shaped.text
    assert arrays.json()["usage"] == {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10}
    for prompt, a, v in zip(prompts, arrays.json()["choices"], shaped.json()["choices"], strict=True):
        found = a["nlm_prompt_logprobs"]
        assert a["text"] == "" and found["top_k"] == 4 and "prompt_logprobs" not in a
        ids = torch.tensor(found["token_ids"]).reshape(len(prompt) - 1, 4)
        values = torch.tensor(found["logprobs"], dtype=torch.float32).reshape(len(prompt) - 1, 4)
        logp = _local_logp(model, prompt)[:-1]  # [L-1, V]: row j predicts token j + 1
        top = logp.topk(4)
        assert torch.equal(ids, top.indices)
        torch.testing.assert_close(values, top.values, rtol=0, atol=1e-5)
        own = logp.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(found["token_logprobs"], dtype=torch.float32), own, rtol=0, atol=1e-5)
        assert found["ranks"] == ((logp > own.unsqueeze(1)).sum(-1) + 1).tolist()
        for position, entry in enumerate(v["prompt_logprobs"][1:]):  # vLLM's shape: the same numbers
            ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])[:4]
            assert [int(k) for k, _ in ranked] == ids[position].tolist()
            assert [item["logprob"] for _, item in ranked] == values[position].tolist()
