"""`nlm serve --engine vllm --draft DRAFT`: vLLM's own draft-model speculative decoding (`speculative_config`)
behind nlm's routes (opt-in: slow, skipped without a vLLM venv). Greedy answers under concurrency equal the
target served without a draft (the nlm engine, in this process); /metrics carries the draft's acceptance
under nlm's names, fed from vLLM's spec-decode counters; SIGTERM stops vLLM without its shutdown warnings.

The draft: the target pruned to 4 of its layers by `nlm init-student` (untrained, so its acceptance is low;
the point here is exactness and the plumbing). Where vLLM is and which model: as in test_serve_vllm.py.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import sys
import time

import httpx
import pytest

from tests.integration.serving import start_server
from tests.integration.test_serve_process import free_port
from tests.integration.test_serve_vllm import PROMPTS, VLLM_PYTHON, model_dir  # noqa: F401 - the shared fixture

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM venv (make setup-vllm, or set VLLM_TEST_PYTHON)")]

GREEDY = {"max_tokens": 24, "temperature": 0}
DRAFTED = 3


@pytest.fixture(scope="module")
def draft(model_dir, tmp_path_factory):  # noqa: F811
    from nlm.cli import main

    folder = tmp_path_factory.mktemp("draft") / "draft"
    assert main(["init-student", "--teacher", str(model_dir), "--output", str(folder), "--num_layers", "4"]) == 0
    return folder


@pytest.fixture(scope="module")
def server(model_dir, draft):  # noqa: F811
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLM_VLLM_PYTHON": VLLM_PYTHON}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = start_server([sys.executable, "-m", "nlm.cli", "serve", "--engine", "vllm", "--model", f"target={model_dir}",
                            "--draft", str(draft), "--num_assistant_tokens", str(DRAFTED), "--port", str(port),
                            "--max_prompt_tokens", "256", "--max_new_tokens_cap", "64", "--request_timeout", "600"],
                           port, env)
    process = started.process
    yield {"base": started.base, "process": process, "lines": started.lines, "reader": started.reader}
    if process.poll() is None:
        process.kill()
        process.wait()


def test_greedy_answers_with_the_draft_equal_the_target_alone_under_concurrency(server, model_dir):  # noqa: F811
    from fastapi.testclient import TestClient

    from nlm.inference.app import create_app
    from nlm.inference.settings import ServerSettings

    assert '"method": "draft_model"' in "".join(server["lines"])  # vLLM was started with the speculative config

    def ask(prompt):
        reply = httpx.post(f"{server['base']}/v1/completions", json={**GREEDY, "model": "target", "prompt": prompt}, timeout=600)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        drafted = list(pool.map(ask, PROMPTS))
    settings = ServerSettings(model=model_dir, served_model_name="target", max_prompt_tokens=256, max_new_tokens_cap=64)
    with TestClient(create_app(settings)) as client:
        while client.get("/ping").status_code != 200:
            time.sleep(0.2)
        alone = [client.post("/v1/completions", json={**GREEDY, "prompt": p}).json()["choices"][0]["text"] for p in PROMPTS]
    assert drafted == alone


def test_metrics_carry_the_drafts_acceptance_under_nlms_names(server):
    # One request alone: the only sequence in the batch, so vLLM drafts for it (speculative_config's schedule)
    reply = httpx.post(f"{server['base']}/v1/completions", json={**GREEDY, "model": "target", "prompt": PROMPTS[0]}, timeout=600)
    assert reply.status_code == 200, reply.text
    text = httpx.get(f"{server['base']}/metrics").text

    def value(name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    steps, proposed, accepted = (value(f"nlm_draft_{n}_total") for n in ("verify_steps", "proposed_tokens", "accepted_tokens"))
    assert steps > 0 and proposed == DRAFTED * steps and 0 <= accepted <= proposed
    assert value("nlm_draft_acceptance_rate") == pytest.approx(accepted / proposed)
    print(f"draft: {accepted:g} of {proposed:g} proposed tokens accepted over {steps:g} verify steps")


def test_sigterm_stops_vllm_without_its_leaked_shared_memory_warning(server):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    server["reader"].join(timeout=30)
    log = "".join(server["lines"])
    assert "resource_tracker" not in log, log[-2000:]
