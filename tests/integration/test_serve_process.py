"""`nlm serve` as a real process on a loopback port: concurrency, batching, the OpenAI client, SIGTERM."""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.serving import wait_until_ready

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nlm.models.scratch import build_causal_lm, build_tokenizer
    from tests.conftest import CORPUS

    folder = tmp_path_factory.mktemp("serve") / "model"
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TEST_API_KEY": "integration-key-123"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nlm.cli", "serve", "--model", str(folder), "--port", str(port),
         "--api_key_env", "TEST_API_KEY", "--max_batch_size", "8", "--batch_window_ms", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base)
    yield {"base": base, "process": process, "headers": {"Authorization": "Bearer integration-key-123"}}
    if process.poll() is None:
        process.kill()
        process.wait()


def _batch_count(base, headers):
    text = httpx.get(f"{base}/metrics", headers=headers).text
    counts = {float(m.group(1)): float(m.group(2)) for m in re.finditer(r'nlm_batch_size_bucket\{le="([0-9.]+)"\} ([0-9.]+)', text)}
    total = float(re.search(r"nlm_batch_size_count ([0-9.]+)", text).group(1))
    return counts, total


def test_concurrent_requests_all_succeed_and_share_batches(server):
    base, headers = server["base"], server["headers"]
    before, _ = _batch_count(base, headers)

    def call(i):
        return httpx.post(f"{base}/invocations", json={"prompt": f"hello {i}", "max_new_tokens": 8}, headers=headers, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(32)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert all(len(r.json()["responses"]) == 1 for r in responses)
    after, _ = _batch_count(base, headers)
    singles = after.get(1.0, 0) - before.get(1.0, 0)
    assert singles < 32, "no two requests shared a batch"


def test_batched_results_equal_single_results(server):
    base, headers = server["base"], server["headers"]
    prompts = ["the quick brown fox", "hello", "a teacher and a student share one tokenizer", "question: what"]
    alone = [httpx.post(f"{base}/invocations", json={"prompt": p, "max_new_tokens": 6}, headers=headers, timeout=60).json()["responses"]
             for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: httpx.post(f"{base}/invocations", json={"prompt": p, "max_new_tokens": 6},
                                                      headers=headers, timeout=60).json()["responses"], prompts))
    assert together == alone


def test_official_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['base']}/v1", api_key="integration-key-123")
    models = client.models.list()
    assert models.data[0].id == "model"
    completion = client.completions.create(model="model", prompt="hello", max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens <= 5 and isinstance(completion.choices[0].text, str)
    chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="model", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, stream=True))
    assert streamed == chat.choices[0].message.content
    with pytest.raises(Exception) as info:
        OpenAI(base_url=f"{server['base']}/v1", api_key="wrong").models.list()
    assert "401" in str(info.value)


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    base, headers = server["base"], server["headers"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{base}/invocations", json={"prompt": "hello", "max_new_tokens": 200},
                              headers=headers, timeout=60)
        time.sleep(0.3)
        server["process"].send_signal(signal.SIGTERM)
        response = pending.result()
    assert response.status_code == 200
    assert server["process"].wait(timeout=60) == 0
    log = server["process"].stdout.read()
    assert "integration-key-123" not in log
    assert "hello" not in log or "prompt=" not in log  # prompts are logged at DEBUG only
    assert json.dumps(response.json())
