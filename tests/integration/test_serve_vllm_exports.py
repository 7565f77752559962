"""What `nlm serve --engine vllm` serves besides a plain folder (opt-in: slow, skipped without a vLLM venv): a LoRA
student through vLLM's adapters equals its merged export served by vLLM, greedy, token for token; the merged
export (`nlm export --format merged`) is served as it is and equals the nlm engine; a SIGKILLed nlm takes its
vLLM processes down. Two vLLM servers, one after the other (each starts in minutes on a CPU).

Where vLLM is and which model: as in test_serve_vllm.py ($VLLM_TEST_PYTHON, $VLLM_TEST_MODEL).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.serving import start_server, stop_server
from tests.integration.test_serve_process import free_port
from tests.integration.test_serve_vllm import PROMPTS, VLLM_PYTHON, model_dir  # noqa: F401 - the shared fixture

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM venv (make setup-vllm, or set VLLM_TEST_PYTHON)")]

GREEDY = {"max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def lora_student(model_dir, tmp_path_factory):  # noqa: F811
    """A LoRA student of the model as `nlm train` saves one (PEFT adapter folder, nlm's target discovery), its
    adapters given non-zero weights so that it answers differently from its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlm.models.lora import find_lora_targets

    folder = tmp_path_factory.mktemp("lora") / "student"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=find_lora_targets(base), init_lora_weights=False)
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def _serve(model_spec: str):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLM_VLLM_PYTHON": VLLM_PYTHON}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = start_server([sys.executable, "-m", "nlm.cli", "serve", "--engine", "vllm", "--model", model_spec,
                            "--port", str(port), "--max_prompt_tokens", "256", "--max_new_tokens_cap", "64",
                            "--request_timeout", "600"],
                           port, env)
    return started.process, started.base, started.lines


def _greedy(base: str, model: str) -> list[str]:
    answers = [httpx.post(f"{base}/v1/completions", json={**GREEDY, "model": model, "prompt": p}, timeout=300)
               for p in PROMPTS]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json()["choices"][0]["text"] for a in answers]


@pytest.fixture(scope="module")
def adapter_answers(lora_student, model_dir):  # noqa: F811
    """Greedy answers of the LoRA student through vLLM's adapters (--enable-lora), and of its base, one server."""
    process, base, lines = _serve(f"student={lora_student}")
    try:
        log = "".join(lines)
        assert "--enable-lora" in log and f"student={lora_student}" in log
        return {"student": _greedy(base, "student")}
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def merged(lora_student, tmp_path_factory):
    from nlm.cli import main

    folder = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["export", "--model", str(lora_student), "--output", str(folder), "--format", "merged"]) == 0
    return folder


@pytest.fixture(scope="module")
def merged_server(merged):
    process, base, lines = _serve(f"merged={merged}")
    yield {"process": process, "base": base, "lines": lines}
    stop_server(process)


def test_a_lora_student_through_vllms_adapters_equals_its_merged_export_served_by_vllm(adapter_answers, merged_server):
    merged_answers = _greedy(merged_server["base"], "merged")
    assert adapter_answers["student"] == merged_answers
    assert any(a.strip() for a in merged_answers)


def test_the_merged_export_is_served_as_it_is_and_equals_the_nlm_engine(merged, merged_server):
    from fastapi.testclient import TestClient

    from nlm.inference.app import create_app
    from nlm.inference.settings import ServerSettings

    ours = _greedy(merged_server["base"], "merged")
    settings = ServerSettings(model=merged, served_model_name="merged", max_prompt_tokens=256, max_new_tokens_cap=64)
    with TestClient(create_app(settings)) as client:
        while client.get("/ping").status_code != 200:
            time.sleep(0.2)
        nlm = [client.post("/v1/completions", json={**GREEDY, "model": "merged", "prompt": p}).json()["choices"][0]["text"]
               for p in PROMPTS]
    assert ours == nlm


def _group(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except ProcessLookupError:
                pass
    return members


def _alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process groups from /proc")
def test_a_sigkilled_nlm_serve_takes_every_vllm_process_down(merged_server):
    process = merged_server["process"]
    guard = int(re.search(r"vLLM for merged runs as pid (\d+)", "".join(merged_server["lines"])).group(1))
    members = _group(guard)  # the guard, vLLM's API server, its engine core
    assert len(members) >= 3, members
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(_alive(pid) for pid in members):
        time.sleep(0.5)
    assert [pid for pid in members if _alive(pid)] == []
