import time

import pytest
from fastapi.testclient import TestClient

from nlm.inference.app import create_app
from nlm.inference.settings import ServerSettings


def wait_ready(client, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get("/ping").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def served(model_dirs):
    settings = ServerSettings(model=model_dirs["student"], max_new_tokens_cap=32, max_prompt_chars=500,
                              max_prompt_tokens=64, max_body_bytes=4096, request_timeout_s=30)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    # Session-wide tiny models (the root conftest's fixture is function-agnostic, reuse it).
    from nlm.models.scratch import build_causal_lm, build_tokenizer
    from tests.conftest import CORPUS

    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    root = tmp_path_factory.mktemp("serve-models")
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=3)
    model.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return {"student": root / "student"}


@pytest.fixture(scope="module")
def served_small_context(tmp_path_factory):
    """A GPT-2-architecture model: absolute positions, only 64 of them (so a prompt plus a token budget that
    the caps allow can still overrun it), a generation_config with several EOS ids and sampling defaults."""
    from nlm.models.scratch import build_causal_lm, build_tokenizer
    from tests.conftest import CORPUS

    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    folder = tmp_path_factory.mktemp("gpt2-small-context") / "gpt"
    model = build_causal_lm("gpt2", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=4, max_positions=64)
    model.generation_config.eos_token_id = [3, 7]
    model.generation_config.do_sample, model.generation_config.top_p = True, 0.9
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = ServerSettings(model=folder, max_new_tokens_cap=512, max_prompt_chars=500, max_prompt_tokens=1024,
                              max_body_bytes=4096, request_timeout_s=30)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client
