"""A teacher behind an OpenAI-compatible server (`nlm serve`, vLLM): its log-probabilities asked over HTTP.

`teacher_url` names the server's `/v1` base. A micro-batch's examples are sent as a list of token-id prompts
to `/v1/completions` with vLLM's `prompt_logprobs: K`. vLLM (one token generated, nothing else asked) answers
per prompt token with the top K keyed by token id. `nlm serve` is asked to score only (`max_tokens: 0`: one
forward pass, no generation machinery) and, with its `nlm_format: "arrays"` extension, answers flat arrays of
ids and log-probs instead of one JSON object per entry (K + 1 per token): the answer is ~3× smaller and parses
without a Python dict per entry; a batch larger than the server's `max_batch_size` goes as several requests,
in flight together. The targets are then the
cache's estimator (docs/TEACHER_CACHE.md): the top K at the run's temperature plus one tail bucket holding
the remaining mass (`SparseTargets`), never a truncated divergence.

Temperature: `nlm serve` takes its `logprobs_temperature` extension, so its top K are exact at τ. A server
without it (vLLM, hosted APIs) returns the model's own distribution (τ = 1); the K + 1 buckets are then
tempered as a distribution of their own (p_i^{1/τ} renormalised, the tail as one bucket) — exact at τ = 1,
an approximation otherwise (docs/DISTRIBUTED.md).

Token identity: the server's tokenizer fingerprint (`/v1/models`, `nlm.models.vocab.vocabulary_fingerprint`)
must equal the student's, else the run is refused (exit 2). Speed: `prefetch(batch)` starts a batch's
requests (a thread pool of `teacher_concurrency`), and `ReadAhead` runs the training iterator a few
micro-batches ahead, so the server works while the student computes. Faults: timeouts, 429 and 5xx are
retried with exponential backoff (logged once per kind); when retries run out `TeacherUnavailableError`
stops the run (the trainer saves a checkpoint first, `--resume` continues); a malformed answer is a
`ServedResponseError` naming the batch, the example and the field.

Written on httpx and a thread pool rather than an async client: the trainer's loop is synchronous, and the
requests need only to overlap each other and the student's compute.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from nlm.distill.cache import rounded_targets
from nlm.distill.targets import SparseTargets, tail_logp
from nlm.distill.teacher import TeacherSignal
from nlm.errors import ConfigError, NlmError
from nlm.models.vocab import vocabulary_fingerprint

logger = logging.getLogger(__name__)

RETRIED_STATUS = {429, 500, 502, 503, 504}


class TeacherUnavailableError(NlmError):
    """The teacher server did not answer within its retries (exit 1; the run saved a checkpoint first)."""

    exit_code = 1


class ServedResponseError(NlmError):
    """The teacher server answered something the loss cannot use (wrong length, NaN, missing field)."""

    exit_code = 1


def _loads(content: bytes) -> Any:
    """Parse an answer; orjson when installed (prompt log-prob answers hold K entries per token), else — and for
    answers orjson refuses, such as a bare NaN, which the per-field checks then name — the json module."""
    import json

    try:
        import orjson

        return orjson.loads(content)
    except (ImportError, ValueError):
        try:
            return json.loads(content)
        except ValueError as exc:
            raise ServedResponseError(f"the teacher server's answer is not JSON ({exc})") from None


def public_url(url: str) -> str:
    """The URL without credentials or query (what logs and training_metadata.json show)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class ServedSettings:
    url: str
    model: str | None = None
    api_key: str | None = None
    top_k: int = 20
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 0.5  # seconds before the first retry; doubles each time, at most 30 s
    prefetch_batches: int = 2

    @classmethod
    def from_config(cls, config: Any) -> ServedSettings:
        key = config.teacher_api_key.get_secret_value() if config.teacher_api_key is not None else None
        return cls(config.teacher_url, config.teacher_served_model, key, config.teacher_top_k, config.teacher_concurrency,
                   config.teacher_timeout, config.teacher_retries, prefetch_batches=config.teacher_prefetch_batches)


@dataclass(frozen=True)
class ServerInfo:
    model: str
    fingerprint: str | None  # None: the server publishes none (vLLM)
    vocab_size: int | None
    max_logprobs: int | None
    nlm: bool  # the card declares nlm_format "arrays" (`nlm serve --engine nlm`): asked with max_tokens 0, that
    # format and logprobs_temperature; any other server is asked in vLLM's shape
    max_batch_size: int | None = None  # the most prompts one request may hold (None: not published)


def _declares_arrays(card: dict[str, Any]) -> bool:
    """Whether a /v1/models entry declares nlm's scoring arrays (`"nlm_format": ["arrays"]`); an nlm serve that
    predates the declaration, --engine vllm and vLLM itself do not, and are asked in vLLM's shape."""
    formats = card.get("nlm_format")
    return isinstance(formats, list) and "arrays" in formats


class TeacherClient:
    """HTTP to one OpenAI-compatible server: the model probe and scoring requests, with retries."""

    def __init__(self, settings: ServedSettings) -> None:
        import httpx

        self.settings = settings
        self.url = public_url(settings.url)
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.Client(base_url=settings.url.rstrip("/") + "/", headers=headers, timeout=settings.timeout,
                                  limits=httpx.Limits(max_connections=settings.concurrency + 2))
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def probe(self) -> ServerInfo:
        """GET /models: the served model, its tokenizer fingerprint and caps. Unreachable: exit 2 naming the URL."""
        import httpx

        try:
            reply = self._http.get("models", timeout=min(self.settings.timeout, 10.0))
        except httpx.HTTPError as exc:
            raise ConfigError(f"teacher_url {self.url} is not reachable ({type(exc).__name__}: {exc}); start the teacher "
                              "server first (e.g. `nlm serve --model TEACHER`) or fix teacher_url") from None
        if reply.status_code != 200:
            raise ConfigError(f"teacher_url {self.url}: GET /models answered {reply.status_code} "
                              f"({reply.text[:200]}); check teacher_url and teacher_api_key")
        data = reply.json().get("data") or []
        names = [entry.get("id") for entry in data]
        wanted = self.settings.model
        if wanted is None:
            if len(names) != 1:
                raise ConfigError(f"teacher_url {self.url} serves {len(names)} models ({', '.join(map(str, names))}): "
                                  "choose one with teacher_served_model")
            wanted = names[0]
        if wanted not in names:
            raise ConfigError(f"teacher_served_model {wanted!r} is not served at {self.url}; it serves {', '.join(map(str, names))}")
        entry = data[names.index(wanted)]
        return ServerInfo(wanted, entry.get("tokenizer_fingerprint"), entry.get("vocab_size"), entry.get("max_logprobs"),
                          _declares_arrays(entry),
                          entry.get("max_batch_size"))

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on timeouts, connection errors, 429 and 5xx (exponential backoff)."""
        import httpx

        attempts = self.settings.retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                reply = self._http.post(path, json=body)
                if reply.status_code == 200:
                    return _loads(reply.content)
                if reply.status_code not in RETRIED_STATUS:
                    raise ServedResponseError(f"teacher server {self.url}: POST /{path} answered {reply.status_code}: "
                                              f"{reply.text[:300]}")
                last = f"HTTP {reply.status_code}"
            except httpx.TimeoutException:
                last = f"timeout after {self.settings.timeout:g} s"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}"
            self._log_once(last)
            if attempt + 1 < attempts:
                time.sleep(min(self.settings.backoff * 2 ** attempt, 30.0))
        raise TeacherUnavailableError(f"teacher server {self.url} did not answer after {attempts} attempts (last: {last}); "
                                      "a checkpoint was saved: rerun with --resume once the server is back")

    def _log_once(self, kind: str) -> None:
        with self._lock:
            if kind not in self._logged:
                self._logged.add(kind)
                logger.warning("teacher server %s: %s; retrying with backoff (logged once per kind)", self.url, kind)

    def close(self) -> None:
        self._http.close()


def prompt_rows(answer: dict[str, Any], tokens: list[int], top_k: int, vocab: int, where: str, index: int = 0,
                prompts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-K ids [L-1, K] and log-probs [L-1, K] for `tokens` (length L) from choice `index` of a
    prompt_logprobs answer to `prompts` prompts: row j is the distribution predicting token j+1. Every check
    names `where` and the field."""
    choices = answer.get("choices")
    if not choices or not isinstance(choices, list):
        raise ServedResponseError(f"{where}: the answer has no choices")
    if len(choices) != prompts:
        raise ServedResponseError(f"{where}: the answer has {len(choices)} choices for {prompts} prompts")
    choices = sorted(choices, key=lambda choice: choice.get("index", 0)) if prompts > 1 else choices
    entries = choices[index].get("prompt_logprobs")
    if not isinstance(entries, list):
        raise ServedResponseError(f"{where}: choices[{index}].prompt_logprobs is missing (does the server support "
                                  "vLLM's prompt_logprobs?)")
    if len(entries) != len(tokens):
        raise ServedResponseError(f"{where}: choices[{index}].prompt_logprobs has {len(entries)} entries for "
                                  f"{len(tokens)} prompt tokens (another tokenizer or a truncated prompt?)")
    ids, values = [], []
    for position, entry in enumerate(entries[1:], start=1):
        field = f"choices[{index}].prompt_logprobs[{position}]"
        if not isinstance(entry, dict):
            raise ServedResponseError(f"{where}: {field} is {type(entry).__name__}, expected an object keyed by token id")
        try:
            ranked = sorted(((int(v["rank"]), int(k), float(v["logprob"])) for k, v in entry.items()))
        except (KeyError, TypeError, ValueError):
            raise ServedResponseError(f"{where}: {field}: expected token id keys with logprob and rank") from None
        top = [item for item in ranked if item[0] <= top_k][:top_k]
        if len(top) < min(top_k, vocab):
            raise ServedResponseError(f"{where}: {field} holds {len(top)} of the {top_k} top log-probs asked "
                                      "(is the server's --max_logprobs lower than teacher_top_k?)")
        if any(not 0 <= token < vocab for _, token, _ in top):
            raise ServedResponseError(f"{where}: {field} names a token id outside the vocabulary of {vocab}")
        if any(not math.isfinite(value) or value > 1e-4 for _, _, value in top):
            raise ServedResponseError(f"{where}: {field} holds a log-prob that is NaN, infinite or positive")
        ids.append([token for _, token, _ in top])
        values.append([value for _, _, value in top])
    return torch.tensor(ids, dtype=torch.int64).reshape(-1, top_k), torch.tensor(values, dtype=torch.float32).reshape(-1, top_k)


def array_rows(answer: dict[str, Any], tokens: list[int], top_k: int, vocab: int, where: str, index: int = 0,
               prompts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt_rows` for nlm's `nlm_format: "arrays"` answer (`nlm_prompt_logprobs`: flat [L-1, K] arrays)."""
    choices = answer.get("choices")
    if not choices or not isinstance(choices, list):
        raise ServedResponseError(f"{where}: the answer has no choices")
    if len(choices) != prompts:
        raise ServedResponseError(f"{where}: the answer has {len(choices)} choices for {prompts} prompts")
    choice = choices[index] if choices[index].get("index", index) == index else next(
        (c for c in choices if c.get("index") == index), {})
    field = f"choices[{index}].nlm_prompt_logprobs"
    arrays = choice.get("nlm_prompt_logprobs")
    if not isinstance(arrays, dict):
        raise ServedResponseError(f"{where}: {field} is missing (an nlm serve that predates nlm_format?)")
    if arrays.get("top_k") != top_k:
        raise ServedResponseError(f"{where}: {field}.top_k is {arrays.get('top_k')!r}, {top_k} were asked "
                                  "(is the server's --max_logprobs lower than teacher_top_k?)")
    rows = len(tokens) - 1
    try:
        ids = torch.tensor(arrays["token_ids"], dtype=torch.int64)
        values = torch.tensor(arrays["logprobs"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise ServedResponseError(f"{where}: {field}: expected token_ids and logprobs arrays of numbers") from None
    if ids.numel() != rows * top_k or values.numel() != rows * top_k:
        raise ServedResponseError(f"{where}: {field} holds {values.numel()} log-probs for {len(tokens)} prompt tokens "
                                  f"at K = {top_k} (another tokenizer or a truncated prompt?)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ServedResponseError(f"{where}: {field}.token_ids names a token id outside the vocabulary of {vocab}")
    if not bool(torch.isfinite(values).all()) or (values.numel() and float(values.max()) > 1e-4):
        raise ServedResponseError(f"{where}: {field}.logprobs holds a log-prob that is NaN, infinite or positive")
    return ids.reshape(rows, top_k), values.reshape(rows, top_k)


def tempered_buckets(logp: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K log-probs at τ = 1 [n, K] -> the K + 1 buckets (top K and the tail) tempered to `temperature`:
    p_i^{1/τ} renormalised over the buckets. Exact at τ = 1; for another τ it treats the tail as one token."""
    buckets = torch.cat([logp, tail_logp(logp).unsqueeze(-1)], dim=-1) / temperature  # [n, K+1]
    buckets = buckets - torch.logsumexp(buckets, dim=-1, keepdim=True)
    return buckets[:, :-1], buckets[:, -1]


class ServedTeacher:
    """The `Teacher` protocol over a `TeacherClient`: sparse top-K targets with a tail bucket."""

    batch_columns: tuple[str, ...] = ()
    full_distribution = False  # top-K rows: no eval KL or adaptive temperature from them
    scores_any_text = True
    hidden_layers = 0
    signal_kind = "rows"
    paired_tokenizer = None
    live_model = None
    device = None

    def __init__(self, client: TeacherClient, info: ServerInfo, vocab_width: int, temperature: float) -> None:
        self.client, self.info = client, info
        self.vocab_width = vocab_width
        self.temperature = temperature
        self.top_k = client.settings.top_k
        self._pool = ThreadPoolExecutor(max_workers=client.settings.concurrency, thread_name_prefix="nlm-teacher")
        self._pending: collections.OrderedDict[tuple[int, ...], collections.deque[Future]] = collections.OrderedDict()
        # Prefetched answers kept: the read-ahead's batches (`prefetch_batches` + the one being computed) plus
        # one batch of slack for those an on-policy step replaced; older ones are dropped.
        self._pending_batches = client.settings.prefetch_batches + 2
        self._lock = threading.Lock()
        self.batches = 0
        self.wait_seconds = 0.0  # time `signal` waited for answers (the benchmark's wait vs compute split)

    # --- requests ----------------------------------------------------------------------------------------

    def _request(self, prompts: list[list[int]]) -> dict[str, Any]:
        """One request for examples of a batch (a list of token-id prompts, as vLLM and nlm serve take them)."""
        if self.info.nlm:  # score only, answered as flat arrays, at the run's temperature
            body: dict[str, Any] = {"model": self.info.model, "prompt": prompts, "max_tokens": 0,
                                    "prompt_logprobs": self.top_k, "nlm_format": "arrays",
                                    "logprobs_temperature": self.temperature}
        else:
            body = {"model": self.info.model, "prompt": prompts if len(prompts) > 1 else prompts[0],
                    "max_tokens": 1, "temperature": 0, "prompt_logprobs": self.top_k}
        return self.client.post("completions", body)

    def _submit(self, prompts: list[list[int]]) -> list[tuple[Future, int, int]]:
        """Start the requests (at most the server's max_batch_size prompts each); each prompt's slot is (its
        future, its choice index, prompts in its request)."""
        size = self.info.max_batch_size or len(prompts)
        slots = []
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            future = self._pool.submit(self._request, chunk)
            slots.extend((future, index, len(chunk)) for index in range(len(chunk)))
        return slots

    def prefetch(self, batch: dict[str, Any]) -> None:
        """Start the request of a batch's examples now; `signal` picks their answers up later."""
        examples = _examples(batch)
        with self._lock:
            for tokens, slot in zip(examples, self._submit(examples), strict=True):
                self._pending.setdefault(tuple(tokens), collections.deque()).append(slot)
            cap = max(64, self._pending_batches * len(examples))  # slots, in examples
            while sum(len(q) for q in self._pending.values()) > cap:  # bounded: drop the oldest
                key, queue = next(iter(self._pending.items()))
                queue.popleft()[0].cancel()
                if not queue:
                    del self._pending[key]

    def _slots(self, examples: list[list[int]]) -> list[tuple[Future, int, int]]:
        """Each example's slot: a prefetched one, else one new request for all the examples not prefetched."""
        slots: list[tuple[Future, int, int] | None] = []
        with self._lock:
            for tokens in examples:
                queue = self._pending.get(tuple(tokens))
                slot = queue.popleft() if queue else None
                if queue is not None and not queue:
                    del self._pending[tuple(tokens)]
                slots.append(slot if slot is not None and not slot[0].cancelled() else None)
        missing = [number for number, slot in enumerate(slots) if slot is None]
        if missing:
            for number, slot in zip(missing, self._submit([examples[n] for n in missing]), strict=True):
                slots[number] = slot
        return slots  # type: ignore[return-value]

    # --- the protocol --------------------------------------------------------------------------------------

    def signal(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device,
               layers: Sequence[int] = (), full_logits: bool = False) -> TeacherSignal:
        if layers:
            raise ConfigError("distillation.hidden_states needs the teacher's hidden states: a served teacher (teacher_url) "
                              "returns log-probabilities only")
        self.batches += 1
        examples = _examples(inputs)
        slots = self._slots(examples)
        ids, logp = [], []
        started = time.perf_counter()
        for number, (tokens, (future, index, prompts)) in enumerate(zip(examples, slots, strict=True)):
            where = f"served teacher {self.client.url}, batch {self.batches}, example {number}"
            rows_of = array_rows if self.info.nlm else prompt_rows
            top_ids, top_logp = rows_of(future.result(), tokens, self.top_k, self.vocab_width, where, index, prompts)
            rows = mask[number].nonzero().squeeze(-1).to("cpu")  # positions j predicting token j+1
            if rows.numel() and int(rows.max()) >= top_ids.shape[0]:
                raise ServedResponseError(f"{where}: a target position {int(rows.max())} lies past the example's "
                                          f"{len(tokens)} tokens")
            ids.append(top_ids[rows])
            logp.append(top_logp[rows])
        self.wait_seconds += time.perf_counter() - started
        top_ids, top_logp = torch.cat(ids), torch.cat(logp)
        if not self.info.nlm:  # the model's own (τ = 1) top-K: temper the K + 1 buckets
            top_logp, _ = tempered_buckets(top_logp, self.temperature)
        # Stored exactly as the cache stores them (fp16 rounded down, the tail what they leave): training from
        # the server and from a cache built through it are the same computation.
        stored, tail = rounded_targets(top_logp)
        targets = SparseTargets(top_ids.to(device), stored.float().to(device), tail.to(device))
        return TeacherSignal(targets.rows, int(top_ids.shape[0]))

    def models(self) -> list[Any]:
        return []

    def wrap_models(self, wrap: Callable[[Any], Any]) -> None:
        return None

    def hidden_size(self) -> int:
        raise ValueError("a served teacher (teacher_url) returns log-probabilities, not hidden states")

    def describe(self) -> dict[str, Any]:
        return {"kind": "served", "teacher_url": self.client.url, "served_model": self.info.model,
                "tokenizer_fingerprint": self.info.fingerprint, "top_k": self.top_k,
                "temperature_exact": self.info.nlm or self.temperature == 1.0}

    def read_ahead(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Requests for the next `prefetch_batches` micro-batches start while the student computes this one."""
        depth = self.client.settings.prefetch_batches
        if depth <= 0 or isinstance(batches, ReadAhead):
            return batches
        return ReadAhead(batches, depth, self.prefetch)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _examples(batch: dict[str, Any]) -> list[list[int]]:
    """Each example's real tokens (the collator pads on the right)."""
    ids, attention = batch["input_ids"], batch.get("attention_mask")
    lengths = attention.sum(-1).tolist() if attention is not None else [ids.shape[1]] * ids.shape[0]
    return [row[:length] for row, length in zip(ids.tolist(), lengths, strict=True)]


class ReadAhead:
    """An iterator that keeps `depth` items of `source` taken ahead, calling `start(item)` on each as it is
    taken: the teacher's requests for the next micro-batches run while the student computes this one.
    Memory: `depth` batches of token ids plus their answers."""

    def __init__(self, source: Iterator[Any], depth: int, start: Callable[[Any], None]) -> None:
        self.source, self.depth, self.start = source, depth, start
        self._ahead: collections.deque[Any] = collections.deque()
        self._done = False

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Any:
        while not self._done and len(self._ahead) < self.depth + 1:
            try:
                item = next(self.source)
            except StopIteration:
                self._done = True
                break
            self.start(item)
            self._ahead.append(item)
        if not self._ahead:
            raise StopIteration
        return self._ahead.popleft()


def check_token_identity(info: ServerInfo, tokenizer: Any, client: TeacherClient) -> None:
    """Refuse a server whose tokenizer differs from the student's (exit 2, naming distillation.cross_tokenizer)."""
    mine = vocabulary_fingerprint(tokenizer)
    if info.fingerprint is None:
        logger.warning("teacher server %s publishes no tokenizer fingerprint (vLLM does not): token identity is "
                       "checked only by the vocabulary size and each answer's length", client.url)
    elif info.fingerprint != mine:
        raise ConfigError(f"teacher_url {client.url}: the served model {info.model!r} has another tokenizer than the "
                          f"student (fingerprint {info.fingerprint[:19]}… vs {mine[:19]}…), so its token ids mean other "
                          "tokens; a served teacher needs the student's tokenizer (distillation.cross_tokenizer works "
                          "with an in-process teacher_model only)")
    if info.vocab_size is not None and int(info.vocab_size) != len(tokenizer):
        raise ConfigError(f"teacher_url {client.url}: the served model has {info.vocab_size} tokens, the student's "
                          f"tokenizer {len(tokenizer)}; a served teacher needs the student's tokenizer "
                          "(distillation.cross_tokenizer works with an in-process teacher_model only)")


def probe_server(config: Any, settings: ServedSettings | None = None) -> tuple[TeacherClient, ServerInfo]:
    """Reach the server named by `teacher_url` (exit 2 naming the URL when it does not answer); `settings`
    instead of the config's when given (`nlm eval`)."""
    settings = settings or ServedSettings.from_config(config)
    client = TeacherClient(settings)
    info = client.probe()
    if info.max_logprobs is not None and settings.top_k > int(info.max_logprobs):
        raise ConfigError(f"teacher_top_k = {settings.top_k} is over the server's cap of {info.max_logprobs} "
                          "top log-probs (nlm serve --max_logprobs / vllm --max-logprobs)")
    return client, info


def load_served_teacher(config: Any, tokenizer: Any, settings: ServedSettings | None = None,
                        temperature: float | None = None) -> ServedTeacher:
    """The run's served teacher, checked to share the student's tokenizer."""
    if config is not None and config.distillation.hidden_states.weight > 0:
        raise ConfigError("distillation.hidden_states needs the teacher's hidden states: a served teacher (teacher_url) "
                          "returns log-probabilities only; use an in-process teacher_model or a cache built with them")
    client, info = probe_server(config, settings)
    check_token_identity(info, tokenizer, client)
    logger.info("teacher served at %s (model %s, top-%d + tail, %d requests in flight)", client.url, info.model,
                client.settings.top_k, client.settings.concurrency)
    return ServedTeacher(client, info, len(tokenizer),
                         temperature if temperature is not None else config.distillation.temperature)
