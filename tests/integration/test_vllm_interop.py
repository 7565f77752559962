"""Opt-in: a real vLLM server (the separate vLLM venv) and `nlm serve` answer the same scoring request alike, and
`nlm teacher-cache` through vLLM equals the in-process cache. Slow (vLLM starts in minutes on this CPU); skipped
when the vLLM venv is absent (built apart: see docs/DISTRIBUTED.md)."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from nlm.cli import main
from tests.conftest import write_jsonl
from tests.integration.serving import start_server, stop_server, wait_until_ready
from tests.integration.test_serve_process import free_port

pytestmark = pytest.mark.slow

# Where vLLM is: $VLLM_TEST_PYTHON, else the repository's .venv-vllm (`make setup-vllm`); as in test_serve_vllm.
_CANDIDATES = [os.environ.get("VLLM_TEST_PYTHON"), str(Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python")]
_PYTHON = next((Path(c) for c in _CANDIDATES if c and Path(c).is_file()), None)
if _PYTHON is None:
    pytest.skip("no vLLM venv (make setup-vllm, or set VLLM_TEST_PYTHON): the vLLM interop test is opt-in",
                allow_module_level=True)
VENV = _PYTHON.parent.parent
K = 20


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import realmodel

    return realmodel.teacher_dir()


@pytest.fixture(scope="module")
def vllm(smollm):
    port = free_port()
    started = start_server(
        [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm),
         "--served-model-name", "teacher", "--max-model-len", "512", "--max-logprobs", "64", "--port", str(port),
         "--dtype", "float32", "--no-enable-prefix-caching"],
        port, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}, health="/v1/models", timeout=600)
    yield f"{started.base}/v1"
    stop_server(started.process)  # SIGTERM: vLLM stops its engine-core and worker processes (a SIGKILL orphans them)


@pytest.fixture(scope="module")
def nlm_server(smollm):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nlm.cli", "serve", "--model", f"teacher={smollm}", "--port", str(port),
                                "--max_logprobs", "64"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until_ready(process, f"http://127.0.0.1:{port}", timeout=300)
    yield f"http://127.0.0.1:{port}/v1"
    process.kill()
    process.wait()


def _prompt_top(url, ids):
    reply = httpx.post(f"{url}/completions", json={"model": "teacher", "prompt": ids, "max_tokens": 1, "temperature": 0,
                                                   "prompt_logprobs": K}, timeout=120)
    assert reply.status_code == 200, reply.text
    entries = reply.json()["choices"][0]["prompt_logprobs"]
    return [sorted(((v["rank"], int(k), v["logprob"]) for k, v in e.items()))[:K] for e in entries[1:]]


def test_nlm_serve_and_vllm_give_the_same_top_k(vllm, nlm_server, smollm):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm)("The parser reads each line of the file and returns a list of records.")["input_ids"]
    ours, theirs = _prompt_top(nlm_server, ids), _prompt_top(vllm, ids)
    assert len(ours) == len(theirs) == len(ids) - 1
    for a, b in zip(ours, theirs, strict=True):
        assert [t for _, t, _ in a[:5]] == [t for _, t, _ in b[:5]]  # the top 5 in the same order
        assert [v for *_, v in a] == pytest.approx([v for *_, v in b], abs=2e-3)


def test_cache_through_vllm_equals_the_in_process_cache(vllm, smollm, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Explain what a parser does.", "completion": " It reads text and "
                                                   "builds a structure from it."}] * 4)
    common = ["teacher-cache", "--train_file", str(data), "--top_k", str(K), "--distillation.temperature", "1"]
    assert main([*common, "--teacher", str(smollm), "--output", str(tmp_path / "local")]) == 0
    assert main([*common, "--teacher_url", vllm, "--student_model", str(smollm), "--output", str(tmp_path / "vllm")]) == 0
    local = load_file(str(next((tmp_path / "local").glob("shard-*.safetensors"))))
    served = load_file(str(next((tmp_path / "vllm").glob("shard-*.safetensors"))))
    agree = (local["ids"][:, :5] == served["ids"][:, :5]).float().mean().item()
    assert agree == 1.0, f"top-5 ids agree on {agree:.1%} of rows"
    torch.testing.assert_close(local["logp"].float(), served["logp"].float(), rtol=0, atol=5e-3)
