"""`nlm serve --draft` as a real process on loopback: greedy outputs byte-identical to serving without the draft,
for the same requests, alone and under concurrency; /metrics reports the draft's acceptance."""

import concurrent.futures
import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.integration.serving import wait_until_ready
from tests.integration.test_serve_process import free_port

pytestmark = pytest.mark.slow


def _spawn(args):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nlm.cli", "serve", "--port", str(port), "--max_batch_size", "8",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return process, f"http://127.0.0.1:{port}"


def _ready(process, base):
    wait_until_ready(process, base)
    return process, base


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from nlm.models.scratch import build_causal_lm, build_tokenizer
    from tests.conftest import CORPUS

    root = tmp_path_factory.mktemp("serve-draft")
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    for name, layers, hidden, seed in (("target", 3, 48, 5), ("draft", 1, 32, 6)):
        build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers,
                        seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    started = [_spawn(["--model", str(root / "target")]),
               _spawn(["--model", str(root / "target"), "--draft", str(root / "draft"), "--num_assistant_tokens", "3"])]
    for process, base in started:  # both start at once
        _ready(process, base)
    yield {"plain": started[0][1], "draft": started[1][1]}
    for process, _ in started:
        process.kill()
        process.wait()


def _complete(base, i):
    body = {"model": "target", "prompt": f"question: what is {i} plus {i}?", "max_tokens": 10 + i % 7, "temperature": 0}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _texts(base):
    alone = [_complete(base, i) for i in range(3)]  # one at a time: every request is drafted
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: batches, drafting stretches that yield
        together = list(pool.map(lambda i: _complete(base, i), range(3, 19)))
    return alone + together


def test_greedy_outputs_are_byte_identical_with_and_without_the_draft(servers):
    assert _texts(servers["draft"]) == _texts(servers["plain"])
    metrics = httpx.get(f"{servers['draft']}/metrics").text
    steps = float(re.search(r"^nlm_draft_verify_steps_total ([0-9.e+]+)$", metrics, re.M).group(1))
    proposed = float(re.search(r"^nlm_draft_proposed_tokens_total ([0-9.e+]+)$", metrics, re.M).group(1))
    accepted = float(re.search(r"^nlm_draft_accepted_tokens_total ([0-9.e+]+)$", metrics, re.M).group(1))
    rate = float(re.search(r"^nlm_draft_acceptance_rate ([0-9.e+-]+)$", metrics, re.M).group(1))
    per_step = float(re.search(r"^nlm_draft_accepted_tokens_per_verify_step ([0-9.e+-]+)$", metrics, re.M).group(1))
    assert steps > 0 and proposed > 0
    assert rate == pytest.approx(accepted / proposed) and per_step == pytest.approx(accepted / steps)
    assert "nlm_draft_verify_steps_total 0.0" in httpx.get(f"{servers['plain']}/metrics").text
