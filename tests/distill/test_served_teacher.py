"""The served teacher's client against a small real HTTP server on loopback that answers what each test needs
(vLLM-shaped answers, malformed ones, 503/429 then success): retries, error messages, the estimator."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nlm.distill.served_teacher import (
    ServedResponseError,
    ServedSettings,
    ServedTeacher,
    ServerInfo,
    TeacherClient,
    TeacherUnavailableError,
    public_url,
    tempered_buckets,
)
from nlm.distill.targets import tail_logp
from nlm.errors import ConfigError

VOCAB, K = 50, 4


def vllm_answer(prompt, top=K, logp=None):
    """vLLM's /v1/completions answer with prompt_logprobs (one choice per prompt of a list of token-id prompts):
    per token after the first, the top `top` by rank."""
    prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
    choices = []
    for index, tokens in enumerate(prompts):
        entries = [None]
        for position in range(1, len(tokens)):
            values = logp if logp is not None else [-0.5 - i for i in range(top)]
            entries.append({str((position + i) % VOCAB): {"logprob": v, "rank": i + 1, "decoded_token": "x"}
                            for i, v in enumerate(values)})
        choices.append({"index": index, "text": "", "prompt_logprobs": entries})
    return {"choices": choices[::-1]}  # in any order: the client sorts by index


def nlm_answer(prompt, top=K, logp=None, drop=0):
    """nlm serve's nlm_format "arrays" answer with the numbers of `vllm_answer` (`drop`: rows left out)."""
    choices = []
    for index, tokens in enumerate(prompt):
        rows = range(1, len(tokens) - drop)
        values = logp if logp is not None else [-0.5 - i for i in range(top)]
        choices.append({"index": index, "text": "", "nlm_prompt_logprobs": {
            "top_k": top, "token_ids": [(p + i) % VOCAB for p in rows for i in range(top)],
            "logprobs": [v for _ in rows for v in values], "token_logprobs": [-1.0 for _ in rows],
            "ranks": [1 for _ in rows]}})
    return {"choices": choices}


NLM_CARD = {"owned_by": "nlm", "tokenizer_fingerprint": "sha256:x", "vocab_size": VOCAB, "max_logprobs": 8,
            "max_batch_size": 2, "logprobs_temperature": True, "nlm_format": ["arrays"]}


class Scripted(BaseHTTPRequestHandler):
    """Answers from the server's `script`: a list of (status, body or callable(request) -> body)."""

    def do_GET(self):
        card = getattr(self.server, "card", None) or {"owned_by": "vllm"}
        self._send(200, {"object": "list", "data": [{"id": "t", "object": "model", **card}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        status, body = self.server.script.pop(0) if self.server.script else (200, lambda r: vllm_answer(r["prompt"]))
        self._send(status, body(request) if callable(body) else body)

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    httpd.script, httpd.requests = [], []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def teacher(server, retries=3, temperature=1.0):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = TeacherClient(ServedSettings(url, top_k=K, retries=retries, backoff=0.01, timeout=5))
    return ServedTeacher(client, client.probe(), VOCAB, temperature)


def batch(*rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for b, r in enumerate(rows):
        mask[b, 1: len(r) - 1] = True  # targets: tokens 2 .. L-1
    return {"input_ids": ids, "attention_mask": attention}, mask


def test_rows_follow_the_mask_and_requests_are_vllm_shaped(server):
    served = teacher(server)
    assert served.info.model == "t" and not served.info.nlm
    inputs, mask = batch([5, 6, 7, 8], [9, 10, 11])
    signal = served.signal(inputs, mask, torch.device("cpu"))
    rows = signal.all_rows()
    assert signal.count == int(mask.sum()) == rows.ids.shape[0] == 3
    # example 0 rows are positions 1, 2 (predicting tokens 2, 3): the answer's entries 2 and 3
    assert rows.ids[0].tolist() == [2, 3, 4, 5] and rows.ids[1].tolist() == [3, 4, 5, 6]
    assert [r["prompt"] for r in server.requests] == [[[5, 6, 7, 8], [9, 10, 11]]]  # one request per batch
    assert all(r["prompt_logprobs"] == K and "logprobs_temperature" not in r for r in server.requests)  # no nlm extension
    probs = rows.logp.double().exp().sum(-1) + rows.tail_logp.double().exp()  # k + 1 buckets sum to one
    torch.testing.assert_close(probs, torch.ones_like(probs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine_takes_temperature", [True, False])
def test_nlm_serve_gets_logprobs_temperature_only_when_its_card_says_it_takes_it(server, engine_takes_temperature):
    # `nlm serve --engine vllm` publishes "logprobs_temperature": false and no nlm_format (vLLM's shape only)
    server.card = {"owned_by": "nlm", "tokenizer_fingerprint": "sha256:x", "vocab_size": VOCAB, "max_logprobs": K,
                   "logprobs_temperature": engine_takes_temperature,
                   "nlm_format": ["arrays"] if engine_takes_temperature else []}
    if engine_takes_temperature:  # --engine nlm: asked for scoring arrays at the run's temperature
        server.script = [(200, lambda r: nlm_answer(r["prompt"]))]
    served = teacher(server, temperature=2.0)
    assert served.info.nlm is engine_takes_temperature
    inputs, mask = batch([5, 6, 7, 8])
    served.signal(inputs, mask, torch.device("cpu")).all_rows()
    assert [r.get("logprobs_temperature") for r in server.requests] == [2.0 if engine_takes_temperature else None]


@pytest.mark.parametrize("card", [
    {"logprobs_temperature": True},  # an nlm serve from before the card declared nlm_format
    {"logprobs_temperature": True, "nlm_format": "arrays"},  # not a list of formats: not trusted
    {"logprobs_temperature": True, "nlm_format": ["something-else"]},
])
def test_a_card_that_does_not_declare_arrays_is_asked_in_vllms_shape(server, card):
    """The arrays path is taken on the card's declaration only, never inferred from other fields."""
    server.card = {"owned_by": "nlm", "tokenizer_fingerprint": "sha256:x", "vocab_size": VOCAB, "max_logprobs": K,
                   "max_batch_size": 2, **card}
    served = teacher(server, temperature=2.0)
    assert not served.info.nlm
    inputs, mask = batch([5, 6, 7, 8])
    served.signal(inputs, mask, torch.device("cpu")).all_rows()
    assert all(r["max_tokens"] == 1 and "nlm_format" not in r and "logprobs_temperature" not in r
               for r in server.requests)


def test_nlm_serve_is_asked_for_scoring_arrays_in_requests_of_its_max_batch_size(server):
    """Against nlm serve: max_tokens 0, nlm_format "arrays", the run's temperature, a batch split to the server's
    max_batch_size (requests in flight together); the targets are the answer's numbers (already at τ), stored
    as the cache stores them, with the ids of vLLM's shape for the same numbers."""
    from nlm.distill.cache import rounded_targets

    rows = ([5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15])
    inputs, mask = batch(*rows)
    expected = teacher(server).signal(inputs, mask, torch.device("cpu")).all_rows()  # vLLM's shape
    stored, tail = rounded_targets(torch.tensor([[-0.5 - i for i in range(K)]] * int(mask.sum())))
    server.card, server.requests = NLM_CARD, []
    server.script = [(200, lambda r: nlm_answer(r["prompt"]))] * 2
    served = teacher(server, temperature=2.0)
    assert served.info.nlm and served.info.max_batch_size == 2
    found = served.signal(inputs, mask, torch.device("cpu")).all_rows()
    assert sorted(len(r["prompt"]) for r in server.requests) == [1, 2]
    assert all(r["max_tokens"] == 0 and r["nlm_format"] == "arrays" and r["logprobs_temperature"] == 2.0
               and r["prompt_logprobs"] == K for r in server.requests)
    assert torch.equal(found.ids, expected.ids)
    assert torch.equal(found.logp, stored.float()) and torch.equal(found.tail_logp, tail)


@pytest.mark.parametrize("answer, field", [
    (lambda r: nlm_answer(r["prompt"], drop=1), "holds 4 log-probs for 3 prompt tokens"),
    (lambda r: nlm_answer(r["prompt"], logp=[-0.1, float("nan"), -2.0, -3.0]), "logprobs holds a log-prob that is NaN"),
    (lambda r: nlm_answer(r["prompt"], top=2), "nlm_prompt_logprobs.top_k is 2, 4 were asked"),
    (lambda r: {"choices": [{"index": 0, "text": ""}]}, "nlm_prompt_logprobs is missing"),
    (lambda r: {"choices": [{"index": 0, "nlm_prompt_logprobs": {"top_k": K, "token_ids": "x", "logprobs": []}}]},
     "expected token_ids and logprobs arrays"),
])
def test_malformed_arrays_name_the_batch_example_and_field(server, answer, field):
    server.card, server.script = NLM_CARD, [(200, answer)]
    served = teacher(server)
    inputs, mask = batch([5, 6, 7])
    with pytest.raises(ServedResponseError, match="batch 1, example 0") as raised:
        served.signal(inputs, mask, torch.device("cpu"))
    assert field in str(raised.value)


def test_tempered_buckets_are_exact_at_temperature_one_and_normalised_otherwise():
    logp = torch.log_softmax(torch.randn(6, 30), -1).topk(5).values
    top, tail = tempered_buckets(logp, 1.0)
    torch.testing.assert_close(top, logp)
    torch.testing.assert_close(tail, tail_logp(logp))
    top, tail = tempered_buckets(logp, 2.0)
    total = top.exp().sum(-1) + tail.exp()
    torch.testing.assert_close(total, torch.ones_like(total))
    assert (top[:, :-1] >= top[:, 1:]).all()  # tempering keeps the order


def test_503_and_429_are_retried_and_logged_once_per_kind(server, caplog):
    server.script = [(503, {"error": "busy"}), (503, {"error": "busy"}), (429, {"error": "slow down"})]
    served = teacher(server)
    inputs, mask = batch([5, 6, 7])
    with caplog.at_level(logging.WARNING, logger="nlm.distill.served_teacher"):
        assert served.signal(inputs, mask, torch.device("cpu")).count == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("HTTP 503" in m for m in messages) == 1 and sum("HTTP 429" in m for m in messages) == 1


def test_exhausted_retries_raise_teacher_unavailable(server):
    server.script = [(503, {})] * 10
    served = teacher(server, retries=2)
    inputs, mask = batch([5, 6, 7])
    with pytest.raises(TeacherUnavailableError, match="after 3 attempts .*HTTP 503.*--resume"):
        served.signal(inputs, mask, torch.device("cpu"))


@pytest.mark.parametrize("answer, field", [
    (lambda r: vllm_answer(r["prompt"][:-1]), "has 2 entries for 3 prompt tokens"),
    (lambda r: vllm_answer(r["prompt"], logp=[-0.1, float("nan"), -2.0, -3.0]), "prompt_logprobs[1] holds a log-prob that is NaN"),
    (lambda r: {"choices": [{"text": ""}]}, "prompt_logprobs is missing"),
    (lambda r: vllm_answer(r["prompt"], top=2, logp=[-0.1, -0.2]), "holds 2 of the 4 top log-probs"),
    (lambda r: {"choices": [{"prompt_logprobs": [None, {"7": {"logprob": -1.0}}, None]}]}, "expected token id keys"),
])
def test_malformed_answers_name_the_batch_example_and_field(server, answer, field):
    server.script = [(200, answer)]
    served = teacher(server)
    inputs, mask = batch([5, 6, 7])
    with pytest.raises(ServedResponseError, match="batch 1, example 0") as raised:
        served.signal(inputs, mask, torch.device("cpu"))
    assert field in str(raised.value)


def test_a_4xx_is_not_retried_and_shows_the_server_message(server):
    server.script = [(422, {"error": {"message": "prompt_logprobs = 4 is over this server's cap of 2"}})]
    served = teacher(server)
    inputs, mask = batch([5, 6, 7])
    with pytest.raises(ServedResponseError, match="answered 422.*cap of 2"):
        served.signal(inputs, mask, torch.device("cpu"))
    assert len(server.requests) == 1


def test_prefetched_requests_are_used_not_repeated(server):
    served = teacher(server)
    inputs, mask = batch([5, 6, 7, 8], [9, 10, 11])
    served.prefetch(inputs)
    served.signal(inputs, mask, torch.device("cpu"))
    assert len(server.requests) == 1


def test_large_batches_read_ahead_are_each_requested_once(server):
    """The read-ahead holds prefetch_batches + 1 batches of 40 examples (120 pending answers, over the old flat
    cap of 64): none is dropped and asked again."""
    served = teacher(server)
    batches = [batch(*[[5 + b, 6 + i % 7, 7, 8 + i % 3] for i in range(40)]) for b in range(5)]
    for number, inputs in enumerate(served.read_ahead(iter([inputs for inputs, _ in batches]))):
        mask = batches[number][1]
        assert served.signal(inputs, mask, torch.device("cpu")).count == int(mask.sum())
    assert len(server.requests) == len(batches)


def test_public_url_drops_credentials_and_unreachable_is_a_config_error():
    assert public_url("http://user:secret@host:8080/v1/?key=1") == "http://host:8080/v1"
    client = TeacherClient(ServedSettings("http://127.0.0.1:9/v1", timeout=2))
    with pytest.raises(ConfigError, match="127.0.0.1:9/v1 is not reachable"):
        client.probe()


def test_describe_records_url_model_and_k(server):
    served = teacher(server)
    described = served.describe()
    assert described["kind"] == "served" and described["served_model"] == "t" and described["top_k"] == K
    assert isinstance(served.info, ServerInfo)
