"""`nlm serve` as a real process serving several models at once: no 5xx for anything a client sends,
context checks, disconnects, EOS and sampling defaults from generation_config, seeds, chat validation,
429 for streams, routing by model, LoRA students sharing one base."""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import torch

from tests.integration.serving import wait_until_ready
from tests.integration.test_serve_process import free_port

pytestmark = pytest.mark.slow

STRICT_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _greedy(model, ids, n):
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def _start(args, env=None, timeout=180):
    port = free_port()
    process = subprocess.Popen([*args, "--port", str(port)] if args[1] == "-m" else [*args, str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base, timeout)
    return process, base


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from nlm.models.scratch import build_causal_lm, build_tokenizer
    from tests.conftest import CORPUS

    root = tmp_path_factory.mktemp("multi")
    tokenizer = build_tokenizer(CORPUS, vocab_size=300, chat_template=STRICT_TEMPLATE)
    main = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=5, max_positions=1024)
    # A prompt whose greedy continuation has no EOS for 400 tokens: requests that hold their slot long enough.
    slow = next(p for p in ("hello", "the quick", "a teacher", "question", "world", "fox", "dog", "small")
                if tokenizer.eos_token_id not in _greedy(main, tokenizer(p)["input_ids"], 400))
    main.save_pretrained(root / "main")
    tokenizer.save_pretrained(root / "main")
    gpt = build_causal_lm("gpt2", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=6, max_positions=64)
    gpt.save_pretrained(root / "gpt")
    tokenizer.save_pretrained(root / "gpt")
    eos = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=7)
    hello = tokenizer("hello\n")["input_ids"]
    first = _greedy(eos, hello, 1)[0]
    eos.generation_config.eos_token_id = [tokenizer.eos_token_id, first]  # the first greedy token ends the answer
    eos.generation_config.do_sample, eos.generation_config.temperature, eos.generation_config.top_k = True, 0.7, 1
    eos.save_pretrained(root / "eos")
    tokenizer.save_pretrained(root / "eos")
    base = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=8)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for index, name in enumerate(("a", "b")):
        lora = get_peft_model(build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=8),
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=16))
        torch.manual_seed(100 + index)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)  # LoRA B starts at zero: make each student differ from the base
        lora.peft_config["default"].base_model_name_or_path = str(root / "base")
        lora.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"root": root, "slow": slow, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def server(models):
    root = models["root"]
    args = [sys.executable, "-m", "nlm.cli", "serve", "--max_concurrent_requests", "8", "--max_new_tokens_cap", "512",
            "--request_timeout", "60", "--max_prompt_chars", "2000"]
    for name in ("main", "gpt", "eos", "a", "b"):
        args += ["--model", f"{name}={root / name}"]
    process, base = _start(args)
    yield {"base": base, "process": process, **models}
    process.kill()
    process.wait()


def _post(base, path, body, timeout=60):
    return httpx.post(f"{base}{path}", json=body, timeout=timeout)


def _metric(base, pattern):
    match = re.search(pattern, httpx.get(f"{base}/metrics").text)
    return float(match.group(1)) if match else 0.0


def test_models_are_listed_and_routed_unknown_is_404(server):
    base = server["base"]
    assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["main", "gpt", "eos", "a", "b"]
    error = _post(base, "/v1/completions", {"model": "nope", "prompt": "hello"}).json()["error"]
    assert error["type"] == "model_not_found" and error["field"] == "model"
    assert all(name in error["message"] for name in ("main", "gpt", "eos", "a", "b"))
    assert _post(base, "/invocations", {"model": "nope", "prompt": "hello"}).status_code == 404
    default = _post(base, "/invocations", {"prompt": "hello", "max_new_tokens": 4}).json()
    named = _post(base, "/invocations", {"model": "main", "prompt": "hello", "max_new_tokens": 4}).json()
    assert default["responses"] == named["responses"] and named["generation_config"]["model"] == "main"


def test_lora_students_share_the_base_and_each_answers_as_when_alone(server):
    """A batch mixing two adapters of one base gives each request what its student gives alone (PEFT generate)."""
    from nlm.models.loading import load_trained_model

    base, root, tokenizer = server["base"], server["root"], server["tokenizer"]
    prompts = ["hello", "the quick brown fox", "a teacher", "question: what"]
    expected = {}
    for name in ("a", "b"):
        student = load_trained_model(root / name)
        expected[name] = [tokenizer.decode([t for t in _greedy(student, tokenizer(p + "\n")["input_ids"], 6)],
                                           skip_special_tokens=True) for p in prompts]
    assert expected["a"] != expected["b"]
    jobs = [(name, i) for i in range(len(prompts)) for name in ("a", "b")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: _post(base, "/invocations", {"model": job[0], "prompt": prompts[job[1]],
                                                                         "max_new_tokens": 6}).json(), jobs))
    for (name, i), answer in zip(jobs, answers, strict=True):
        assert expected[name][i].startswith(answer["responses"][0]), (name, i, answer)


def test_context_limit_is_422_naming_it_and_spares_the_others(server):
    base = server["base"]
    good = [{"model": "gpt", "prompt": f"hello {i}", "max_new_tokens": 8} for i in range(6)]
    bad = [{"model": "gpt", "prompt": "hello", "max_new_tokens": 300},
           {"model": "gpt", "prompt": "the quick brown fox " * 3, "max_new_tokens": 40}]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: _post(base, "/invocations", body), good + bad))
    assert [r.status_code for r in responses] == [200] * 6 + [422, 422], [r.text for r in responses]
    for response in responses[6:]:
        error = response.json()["error"]
        assert "context of 64 tokens" in error["message"] and error["field"] == "max_new_tokens"
    chat = _post(base, "/v1/chat/completions", {"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    assert chat.status_code == 422 and chat.json()["error"]["field"] == "max_tokens" and "64" in chat.text
    fitted = _post(base, "/v1/completions", {"model": "gpt", "prompt": "the quick brown fox " * 3, "temperature": 0})
    assert fitted.status_code == 200  # no budget asked: the default shrinks to what the context leaves
    usage = fitted.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 64


def test_eos_ids_and_sampling_defaults_come_from_generation_config(server):
    base = server["base"]
    body = _post(base, "/invocations", {"model": "eos", "prompt": "hello", "max_new_tokens": 10}).json()
    assert body["responses"] == [""]  # its first greedy token is an EOS id of generation_config only
    used = body["generation_config"]
    assert used["do_sample"] is True and used["top_k"] == 1 and used["temperature"] == 0.7
    completion = _post(base, "/v1/completions", {"model": "eos", "prompt": "hello\n", "max_tokens": 10}).json()
    assert completion["choices"][0]["finish_reason"] == "stop" and completion["usage"]["completion_tokens"] == 0
    plain = _post(base, "/invocations", {"model": "main", "prompt": "hello", "max_new_tokens": 2}).json()
    assert plain["generation_config"]["do_sample"] is False


def test_a_seed_reproduces_one_request_amid_other_sampling_traffic(server):
    base = server["base"]
    seeded = {"model": "main", "prompt": "hello", "max_new_tokens": 8, "temperature": 1.5, "seed": 11}
    alone = _post(base, "/invocations", seeded).json()["responses"]
    others = [{"model": "main", "prompt": "hello", "max_new_tokens": 8, "temperature": 1.5} for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        crowd = list(pool.map(lambda body: _post(base, "/invocations", body).json()["responses"], others + [seeded]))
    assert crowd[-1] == alone
    assert len({tuple(r) for r in crowd[:-1]}) > 1, "unseeded requests all sampled the same text"


def test_every_chat_message_is_validated_before_templating(server):
    base = server["base"]

    def chat(messages):
        return _post(base, "/v1/chat/completions", {"model": "main", "messages": messages, "max_tokens": 3, "temperature": 0})

    long = chat([{"role": "system", "content": "x" * 2001}, {"role": "user", "content": "hi"}])
    assert long.status_code == 422 and long.json()["error"]["field"] == "messages.0.content"
    tool = chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "y" * 2001}])
    assert tool.status_code == 422 and tool.json()["error"]["field"] == "messages.1.content"
    refused = chat([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
    assert refused.status_code == 422 and "roles must alternate" in refused.json()["error"]["message"]
    empty = chat([{"role": "assistant", "content": "\x00\x01"}])
    assert empty.status_code == 422
    fine = chat([{"role": "system", "content": "be\x07 brief"}, {"role": "user", "content": "hi"}])
    assert fine.status_code == 200, fine.text


def test_a_client_that_hangs_up_frees_its_slot(server):
    base = server["base"]
    idle_by = time.time() + 60  # earlier tests' requests may still hold slots: start from an idle server
    while time.time() < idle_by and _metric(base, r"nlm_requests_in_flight ([0-9.]+)") > 0:
        time.sleep(0.1)
    before = _metric(base, r'nlm_requests_total\{route="/invocations",status="499"\} ([0-9.]+)')
    try:  # 500 greedy tokens take far longer than 0.02 s (yet on a quiet machine they came back within 0.1 s, so 0.1 no longer hung up), so the client hangs up mid-generation
        response = _post(base, "/invocations", {"model": "main", "prompt": server["slow"], "max_new_tokens": 500}, timeout=0.02)
        pytest.fail(f"expected a hang-up, got {response.status_code}: {response.text[:200]}")
    except httpx.ReadTimeout:
        pass
    deadline = time.time() + 60  # generous: the server notices the hang-up at its next step, slower under load
    while time.time() < deadline and _metric(base, r"nlm_requests_in_flight ([0-9.]+)") > 0:
        time.sleep(0.1)
    assert _metric(base, r"nlm_requests_in_flight ([0-9.]+)") == 0
    assert _metric(base, r'nlm_requests_total\{route="/invocations",status="499"\} ([0-9.]+)') == before + 1


def test_a_stream_refused_for_capacity_is_http_429(server):
    base = server["base"]
    hold = {"model": "main", "prompt": server["slow"], "max_new_tokens": 400}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = [pool.submit(_post, base, "/invocations", hold) for _ in range(8)]
        deadline = time.time() + 20
        while time.time() < deadline and _metric(base, r"nlm_requests_in_flight ([0-9.]+)") < 8:
            time.sleep(0.02)
        with httpx.stream("POST", f"{base}/v1/completions", json={"model": "main", "prompt": "hi", "stream": True},
                          timeout=30) as response:
            status = response.status_code
            body = json.loads(response.read())
        assert all(f.result().status_code == 200 for f in held)
    assert status == 429 and body["error"]["type"] == "rate_limited"


BAD_BODIES = [
    {"model": "gpt", "prompt": "hello", "max_new_tokens": 300},
    {"model": "gpt", "prompt": "x " * 80},
    {"model": "gpt", "prompt": "hello", "max_length": 500},
    {"model": "nope", "prompt": "hello"},
    {"prompt": "hello", "max_new_tokens": 10**9},
    {"prompt": "hello", "temperature": float("1e308")},
    {"prompt": ["not", "a", "string"]},
    {"prompt": "hello", "num_return_sequences": 3},
    {"prompt": "\x00" * 50},
    [1, 2, 3],
    "just a string",
    None,
]
BAD_CHATS = [
    {"model": "gpt", "messages": [{"role": "user", "content": "hi " * 40}], "max_tokens": 60},
    {"model": "main", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"model": "main", "messages": [{"role": "tool", "content": "z" * 5000}]},
    {"model": "main", "messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]},
    {"model": "main", "messages": "hello"},
]
# Odd but valid /v1/completions requests: each answers 200 (echo alone with max_tokens 0 once gave 500).
ODD_COMPLETIONS = [
    {"model": "main", "prompt": "Hello", "max_tokens": 0, "echo": True},
    {"model": "main", "prompt": [5, 6, 7], "max_tokens": 0, "echo": True},
]


def test_concurrent_bad_requests_mixed_with_good_ones_never_5xx(server):
    base = server["base"]
    calls = [("/invocations", {"model": "gpt", "prompt": f"hello {i}", "max_new_tokens": 6}) for i in range(8)]
    calls += [("/invocations", body) for body in BAD_BODIES] + [("/v1/chat/completions", body) for body in BAD_CHATS]
    calls += [("/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 5, "temperature": 0}) for m in ("main", "a", "b", "eos")]
    calls += [("/v1/completions", body) for body in ODD_COMPLETIONS]

    def call(item):
        path, body = item
        for _ in range(50):
            response = httpx.post(f"{base}{path}", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
            if response.status_code != 429:
                return response
            time.sleep(0.1)
        return response

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, calls))
    assert all(r.status_code < 500 for r in responses), [(c, r.status_code, r.text) for c, r in zip(calls, responses, strict=True) if r.status_code >= 500]
    good = [r for (path, body), r in zip(calls, responses, strict=True) if isinstance(body, dict) and "hello " in str(body.get("prompt"))]
    assert all(r.status_code == 200 for r in good)
    assert all(r.status_code in (400, 404, 413, 422) for r in responses[8:8 + len(BAD_BODIES) + len(BAD_CHATS)])
    assert all(r.status_code == 200 for r in responses[len(responses) - len(ODD_COMPLETIONS):])


def test_ping_is_503_when_the_generation_worker_dies(models, tmp_path):
    """A worker thread that dies (here: a model whose forward raises a BaseException after warm-up) turns /ping
    into 503 and fails requests with 503 instead of leaving them waiting."""
    script = tmp_path / "broken_serve.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from nlm.inference.model_registry import load_served_models
        from nlm.inference.server import serve
        from nlm.inference.settings import ServerSettings

        class Fatal(BaseException):
            pass

        def loader(settings):
            served = load_served_models(settings)
            model, calls = served[0].model, {{"n": 0}}
            forward = model.forward
            def broken(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] > 2:  # warm-up runs two forward passes
                    raise Fatal("worker killed")
                return forward(*args, **kwargs)
            model.forward = broken
            return served

        serve(ServerSettings(model=Path({str(models["root"] / "main")!r}), port=int(sys.argv[1])), loader=loader)
    """))
    process, base = _start([sys.executable, str(script)])
    try:
        first = _post(base, "/invocations", {"prompt": "hello", "max_new_tokens": 4}, timeout=30)
        assert first.status_code == 503, first.text
        assert httpx.get(f"{base}/ping").status_code == 503
        assert httpx.get(f"{base}/ping").json() == {"status": "failed"}
        assert _post(base, "/invocations", {"prompt": "hello"}).status_code == 503
    finally:
        process.kill()
        process.wait()
