"""Contract tests for every route, status code and validation rule, through the ASGI test client."""

import threading

import pytest
from fastapi.testclient import TestClient

from nlm.inference.app import create_app, default_loader
from nlm.inference.settings import ServerSettings
from tests.inference.conftest import wait_ready


def _error(response, status, field=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message", "field"} <= set(body["error"])
    if field is not None:
        assert body["error"]["field"] == field, body
    return body["error"]


def test_ping_is_healthy_once_loaded(served):
    response = served.get("/ping")
    assert response.status_code == 200 and response.json() == {"status": "healthy"}


def test_ping_is_503_while_loading(model_dirs):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        return default_loader(settings)

    with TestClient(create_app(ServerSettings(model=model_dirs["student"]), loader=slow_loader)) as client:
        assert client.get("/ping").status_code == 503
        assert client.get("/ping").json() == {"status": "loading"}
        _error(client.post("/invocations", json={"prompt": "hello"}), 503)
        release.set()
        wait_ready(client)


def test_failed_load_is_reported(tmp_path):
    with TestClient(create_app(ServerSettings(model=tmp_path))) as client:
        for _ in range(200):
            if client.get("/ping").json()["status"] == "failed":
                break
            threading.Event().wait(0.05)
        assert client.get("/ping").status_code == 503 and client.get("/ping").json() == {"status": "failed"}


def test_invocations_contract(served):
    response = served.post("/invocations", json={"prompt": "hello world", "max_new_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"responses", "input_prompt", "generation_config"}
    assert len(body["responses"]) == 1 and isinstance(body["responses"][0], str)
    assert body["input_prompt"] == "hello world"
    used = body["generation_config"]
    assert used["max_new_tokens"] == 5 and used["do_sample"] is False and used["temperature"] == 0.0
    assert used["max_length"] == used["prompt_tokens"] + 5


def test_greedy_is_deterministic_and_max_length_counts_the_prompt(served):
    a = served.post("/invocations", json={"prompt": "the quick", "max_new_tokens": 6}).json()
    b = served.post("/invocations", json={"prompt": "the quick", "max_length": a["generation_config"]["prompt_tokens"] + 6}).json()
    assert a["responses"] == b["responses"]
    assert b["generation_config"]["max_new_tokens"] == 6


def test_sampling_with_seed_is_reproducible_and_returns_n(served):
    request = {"prompt": "hello", "temperature": 1.5, "top_p": 0.9, "top_k": 50, "seed": 7, "num_return_sequences": 3, "max_new_tokens": 8}
    first, second = served.post("/invocations", json=request).json(), served.post("/invocations", json=request).json()
    assert len(first["responses"]) == 3 and first["responses"] == second["responses"]
    assert first["generation_config"]["do_sample"] is True and first["generation_config"]["seed"] == 7


def test_stop_strings_cut_the_output(served):
    free = served.post("/invocations", json={"prompt": "hello world", "max_new_tokens": 16}).json()["responses"][0]
    if len(free) < 3:
        pytest.skip("the tiny model produced too little text to cut")
    stop = free[1:3]
    cut = served.post("/invocations", json={"prompt": "hello world", "max_new_tokens": 16, "stop": [stop]}).json()
    assert cut["responses"][0] == free[: free.find(stop)]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 33}, "max_new_tokens"),
    ({"prompt": "x", "num_return_sequences": 5, "temperature": 1}, "num_return_sequences"),
    ({"prompt": "x", "num_return_sequences": 2}, "num_return_sequences"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "   \n\t "}, "prompt"),
    ({"prompt": "\x00\x01\x02"}, "prompt"),
    ({"prompt": "a" * 501}, "prompt"),
    ({"prompt": "hello " * 100}, "prompt"),
    ({"prompt": "hello world", "max_length": 2}, "max_length"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "seed": -1}, "seed"),
])
def test_validation_errors_are_422_naming_the_field(served, body, field):
    _error(served.post("/invocations", json=body), 422, field)


def test_unknown_fields_are_rejected_by_name(served):
    error = _error(served.post("/invocations", json={"prompt": "x", "temprature": 1}), 422, "temprature")
    assert error["type"] == "unknown_field" and "temprature" in error["message"]


def test_control_characters_are_removed_from_prompts(served):
    body = served.post("/invocations", json={"prompt": "hel\x00lo\x07 wor\tld\nok", "max_new_tokens": 1}).json()
    assert body["input_prompt"] == "hello wor\tld\nok"


def test_bad_json_wrong_type_and_wrong_content_type(served):
    _error(served.post("/invocations", content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(served.post("/invocations", json=["a", "list"]), 422)
    error = _error(served.post("/invocations", content=b"prompt=x", headers={"content-type": "application/x-www-form-urlencoded"}), 415)
    assert "application/json" in error["message"]
    _error(served.post("/invocations", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}), 415)


def test_oversized_body_is_413(served):
    _error(served.post("/invocations", json={"prompt": "x" * 5000}), 413)

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    _error(served.post("/invocations", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_headers_are_ignored(served):
    response = served.post("/invocations", json={"prompt": "hello", "max_new_tokens": 2},
                           headers={"X-Amzn-SageMaker-Custom-Attributes": "a=b", "X-Whatever": "1"})
    assert response.status_code == 200


def test_unknown_route_and_method(served):
    _error(served.get("/nope"), 404)
    _error(served.get("/invocations"), 405)


def test_openapi_spec_lists_the_routes(served):
    spec = served.get("/openapi.json").json()
    assert {"/ping", "/invocations", "/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])


def test_v1_models(served):
    body = served.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "student"


def test_v1_completions_with_usage(served):
    body = served.post("/v1/completions", json={"model": "student", "prompt": "hello", "max_tokens": 4, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] <= 4


def test_v1_chat_completions(served):
    body = served.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "max_tokens": 4, "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 0


def test_v1_validation(served):
    _error(served.post("/v1/completions", json={"prompt": "x", "max_tokens": 100}), 422, "max_tokens")
    _error(served.post("/v1/completions", json={"prompt": "x", "logit_bias": {"1": 2}}), 422, "logit_bias")
    _error(served.post("/v1/chat/completions", json={"messages": []}), 422, "messages")
    _error(served.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 422)
    _error(served.post("/v1/completions", json={"prompt": "x", "stream": True, "n": 2}), 422, "n")


def test_streaming_sends_events_ending_with_done(served):
    with served.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    whole = served.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0}).json()
    assert streamed == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics_are_prometheus_text(served):
    served.post("/invocations", json={"prompt": "hello", "max_new_tokens": 2})
    text = served.get("/metrics").text
    for name in ("nlm_requests_total", "nlm_request_latency_seconds_bucket", "nlm_generated_tokens_total",
                 "nlm_queue_depth", "nlm_batch_size_bucket"):
        assert name in text, name
    assert 'route="/invocations",status="200"' in text


def test_api_key_guards_every_route_but_ping(model_dirs):
    settings = ServerSettings(model=model_dirs["student"], api_key="s3cret-key-value")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert client.get("/ping").status_code == 200
        for method, path in (("get", "/metrics"), ("get", "/v1/models"), ("post", "/invocations")):
            _error(getattr(client, method)(path), 401)
        _error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = client.post("/invocations", json={"prompt": "hi", "max_new_tokens": 1}, headers={"Authorization": "Bearer s3cret-key-value"})
        assert ok.status_code == 200


def test_queue_limit_answers_429(model_dirs):
    settings = ServerSettings(model=model_dirs["student"], max_concurrent_requests=1)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        client.app.state.nlm.in_flight = 1  # a request is in flight
        _error(client.post("/invocations", json={"prompt": "hi"}), 429)
        client.app.state.nlm.in_flight = 0
        assert client.post("/invocations", json={"prompt": "hi", "max_new_tokens": 1}).status_code == 200


def test_timeout_answers_504_and_frees_the_slot(model_dirs):
    settings = ServerSettings(model=model_dirs["student"], request_timeout_s=0.001, max_new_tokens_cap=512)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        error = _error(client.post("/invocations", json={"prompt": "hello", "max_new_tokens": 500}), 504)
        assert "longer than" in error["message"]
        assert client.app.state.nlm.in_flight == 0
