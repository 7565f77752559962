"""The HTTP app: SageMaker's /ping and /invocations, OpenAI-compatible /v1 routes, Prometheus /metrics.

The models load in a background thread when the app starts, so /ping answers 503 until they are loaded and
warmed up (and again if a generation worker dies). Requests pick a model by name (`model`); the first is the
default. Every error is JSON `{"error": {"type", "message", "field"}}`; nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from nlm.inference.engine import (
    GenerationJob,
    GenerationOutput,
    PromptScores,
    ScoringJob,
    ScoringTooLarge,
    WorkerStopped,
)
from nlm.inference.engines import engine_kind
from nlm.inference.jobs import (
    ClientError,
    chat_prompt_ids,
    clean_prompt,
    encode_prompt,
    invocation_job,
    openai_job,
)
from nlm.inference.logprobs import (
    chat_logprobs,
    chat_spec,
    completion_choices,
    completion_spec,
    json_body,
    model_card,
    prompt_token_ids,
    scored_choices,
)
from nlm.inference.metrics import ServerMetrics
from nlm.inference.middleware import GuardMiddleware
from nlm.inference.model_registry import ServedModel
from nlm.inference.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    InvocationRequest,
    InvocationResponse,
)
from nlm.inference.settings import ServerSettings

logger = logging.getLogger("nlm.serve")

Loader = Callable[[ServerSettings], list[ServedModel]]  # loads every served model, in order
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 429, 499, 503, 504)}


class _SlotStreamingResponse(StreamingResponse):
    """An event stream that gives its admission slot back however it ends, even if the client left before the
    first event (then the body generator never runs, and its own `finally` with it)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def default_loader(settings: ServerSettings) -> list[ServedModel]:
    """The served models of `settings.engine` (nlm: loaded in this process; vllm: tokenizers and configs only)."""
    return engine_kind(settings.engine).load(settings)


def _error(status: int, kind: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "field": field}}, status_code=status)


class Server:
    """One server's state and the request lifecycle every route shares: readiness, admission (429), running a
    job on its model's engine (504, client hang-up), metrics. The routes below only translate HTTP to jobs."""

    def __init__(self, settings: ServerSettings, loader: Loader, on_load_failure: Callable[[str], None] | None) -> None:
        self.settings = settings
        self.loader = loader
        self.on_load_failure = on_load_failure
        self.metrics = ServerMetrics()
        self.models: dict[str, ServedModel] = {}  # by served name; the first is the default
        self.engines: dict[str, Any] = {}  # by served name (students sharing a base share one engine)
        self.ready = False
        self.failure: str | None = None
        self.in_flight = 0
        # Templating and tokenising run here, off the event loop (one thread: fast tokenizers are not re-entrant).
        self.text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlm-tokenize")

    def load(self) -> None:
        try:
            served = self.loader(self.settings)
            self.engines = engine_kind(self.settings.engine).start(served, self.settings, self.metrics)
            self.models = {entry.name: entry for entry in served}
            self.ready = True
            logger.info("serving %s (loaded and warmed up)", ", ".join(self.models))
        except Exception as exc:  # noqa: BLE001 - reported through /ping and the exit code
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("model could not be loaded: %s", self.failure)
            if self.on_load_failure is not None:
                self.on_load_failure(self.failure)

    def stop(self) -> None:
        for engine in self.unique_engines():
            engine.stop()
        self.text_pool.shutdown(wait=False)

    def unique_engines(self) -> list[Any]:
        return list({id(e): e for e in self.engines.values()}.values())

    def dead_engines(self) -> bool:
        return any(not engine.alive for engine in self.engines.values())

    def served(self, name: str | None) -> ServedModel:
        if not self.ready:
            raise ClientError(503, "the model is still loading" if self.failure is None else "the model failed to load",
                              kind="unavailable")
        if self.dead_engines():
            raise ClientError(503, "the generation worker has stopped; restart the server", kind="unavailable")
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            served = ", ".join(self.models)
            raise ClientError(404, f"model {name!r} is not served here; served: {served}", "model", kind="model_not_found")
        return self.models[name]

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    def admit(self) -> None:
        """Take a slot, or refuse at once with 429 (before any response starts, streaming included)."""
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            raise ClientError(429, f"the server is at its limit of {limit} concurrent requests; retry later",
                              kind="rate_limited")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.queue_depth.set(self.queue_depth())

    def queue_depth(self) -> int:
        return sum(engine.queue_depth for engine in self.unique_engines())

    async def generate(self, job: GenerationJob, served: ServedModel, request: Request | None) -> GenerationOutput:
        """Run an admitted job: 504 past the timeout; a client that hangs up cancels it and frees its place."""
        engine = self.engines[served.name]
        self.metrics.queue_depth.set(self.queue_depth() + 1)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        output = await self._settle(engine.generate(job), job, request)
        self.metrics.generated_tokens.inc(output.completion_tokens)
        return output

    async def score(self, job: ScoringJob, served: ServedModel, request: Request | None) -> list[PromptScores]:
        """Score prompts (one admitted request, however many prompts), under the same timeout and hang-up rules."""
        self.admit()
        try:
            self.metrics.queue_depth.set(self.queue_depth() + 1)
            self.metrics.prompt_tokens.inc(sum(len(prompt) for prompt in job.prompts))
            return await self._settle(self.engines[served.name].score(job), job, request)
        except ScoringTooLarge as exc:  # deterministic for this request: 413, which clients do not retry
            raise ClientError(413, str(exc), "prompt", kind="payload_too_large") from None
        finally:
            self.release()

    async def _settle(self, work: Any, job: GenerationJob | ScoringJob, request: Request | None) -> Any:
        generation = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            done, _ = await asyncio.wait({generation} | ({watch} if watch else set()),
                                         timeout=self.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if generation in done:
                return generation.result()
            job.cancelled = True
            generation.cancel()
            if watch is not None and watch in done:
                raise ClientError(499, "the client closed the connection; generation was cancelled", kind="client_closed_request")
            raise ClientError(504, f"generation took longer than {self.settings.request_timeout_s:g} s", kind="timeout")
        finally:
            if watch is not None:
                watch.cancel()

    async def run(self, job: GenerationJob, served: ServedModel, request: Request | None = None) -> GenerationOutput:
        self.admit()
        try:
            return await self.generate(job, served, request)
        finally:
            self.release()


ServerState = Server  # the name tests and older code know


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up. The body is already read, so the next ASGI message can only be
    the disconnect: waiting on it costs no polling (wake-ups would take the GIL from the worker thread)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _server(request: Request) -> Server:
    return request.app.state.nlm


router = APIRouter()


@router.get("/ping", responses={503: {"model": ErrorResponse}})
async def ping(request: Request) -> JSONResponse:
    server = _server(request)
    if server.ready and not server.dead_engines():
        return JSONResponse({"status": "healthy"})
    status = "failed" if server.failure or server.ready else "loading"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    server = _server(request)
    server.metrics.queue_depth.set(server.queue_depth())
    for engine in server.unique_engines():
        await engine.refresh_metrics(server.metrics)
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/invocations", response_model=InvocationResponse, responses=ERRORS)
async def invocations(body: InvocationRequest, request: Request) -> InvocationResponse:
    server = _server(request)
    served = server.served(body.model)
    job, used, prompt = await server.off_loop(invocation_job, body, served, server.settings)
    logger.debug("invocation prompt=%r", prompt)
    output = await server.run(job, served, request)
    logger.debug("invocation responses=%r", output.texts)
    return InvocationResponse(responses=output.texts, input_prompt=prompt, generation_config={"model": served.name, **used})


@router.get("/v1/models")
async def models(request: Request) -> dict:
    server = _server(request)
    names = list(server.models) if server.ready else [name for name, _ in server.settings.served_models]
    cards = ({name: model_card(entry.tokenizer, server.settings) for name, entry in server.models.items()}
             if server.ready else {})
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nlm", **cards.get(name, {})}
                                       for name in names]}


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    server = _server(request)
    settings = server.settings
    served = server.served(body.model)
    spec = completion_spec(body, settings)  # log-probs asked for (nlm/inference/logprobs.py)
    if spec is not None and body.stream:
        raise ClientError(422, "stream with logprobs is not supported; ask without stream", "stream")

    def prepare() -> GenerationJob:
        if isinstance(body.prompt, list):
            ids = prompt_token_ids(body.prompt, served.tokenizer, settings)
        else:
            ids = encode_prompt(served.tokenizer, clean_prompt(body.prompt, settings), settings)
        job = openai_job(ids, body, settings, body.max_tokens, served)
        job.logprobs = spec
        return job

    if body.nlm_format == "arrays" and (body.prompt_logprobs is None or body.max_tokens != 0 or (body.n or 1) != 1
                                        or body.stream):
        raise ClientError(422, 'nlm_format "arrays" shapes prompt_logprobs of a scored prompt: ask for prompt_logprobs '
                               "with max_tokens 0, n 1 and no stream", "nlm_format")
    # echo alone (no log-probs) is no scoring: it takes the generate path, which echoes the prompt.
    if (spec is not None and body.max_tokens == 0 and (body.n or 1) == 1 and not body.stream
            and server.engines[served.name].scores_prompts):
        return await _score(server, body, served, spec, request)
    if body.nlm_format == "arrays":  # --engine vllm: no one-pass scoring there
        raise ClientError(422, 'nlm_format "arrays" is served by --engine nlm; this server runs --engine vllm: ask in '
                               "vLLM's shape (prompt_logprobs)", "nlm_format")
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], list):
        return await _prompt_batch(server, body, served, spec)
    job = await server.off_loop(prepare)

    def shape(output: GenerationOutput) -> list[dict]:
        text = body.prompt if isinstance(body.prompt, str) else served.tokenizer.decode(job.prompt_ids)
        return completion_choices(body, output, job.prompt_ids, text, served.tokenizer)

    answer = await _respond(server, job, served, body.stream, "text_completion", chat=False, request=request, shape=shape)
    # Log-probs make large bodies (K entries per token): serialised directly, not walked by jsonable_encoder.
    return json_body(answer) if spec is not None else answer


async def _score(server: Server, body: CompletionRequest, served: ServedModel, spec: Any, request: Request) -> Any:
    """max_tokens 0: the prompts (one, or a list of token-id prompts) are scored in one forward pass, nothing is
    generated; choice i answers prompt i."""
    settings = server.settings
    nested = isinstance(body.prompt, list) and bool(body.prompt) and isinstance(body.prompt[0], list)
    if nested and len(body.prompt) > settings.max_batch_size:
        raise ClientError(422, f"{len(body.prompt)} prompts in one request; the limit is --max_batch_size "
                               f"{settings.max_batch_size}", "prompt")

    def prepare() -> list[list[int]]:
        if nested:
            return [prompt_token_ids(ids, served.tokenizer, settings) for ids in body.prompt]
        if isinstance(body.prompt, list):
            return [prompt_token_ids(body.prompt, served.tokenizer, settings)]
        return [encode_prompt(served.tokenizer, clean_prompt(body.prompt, settings), settings)]

    prompts = await server.off_loop(prepare)
    longest = max(len(prompt) for prompt in prompts)
    if served.context is not None and longest > served.context:
        raise ClientError(422, f"a prompt has {longest} tokens; this model's context is {served.context} tokens", "prompt")
    scores = await server.score(ScoringJob(prompts, spec, adapter=served.adapter), served, request)
    texts = [body.prompt] if isinstance(body.prompt, str) else None
    choices = await server.off_loop(scored_choices, body, scores, prompts, texts, served.tokenizer)
    tokens = sum(len(prompt) for prompt in prompts)
    return json_body({"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                      "model": served.name, "choices": choices,
                      "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}})


async def _prompt_batch(server: Server, body: CompletionRequest, served: ServedModel, spec: Any) -> Any:
    """Several token-id prompts in one request (as vLLM takes them): one job each, run together through the
    batcher; choice i answers prompt i."""
    settings = server.settings
    if (body.n or 1) != 1 or body.stream:
        raise ClientError(422, "a list of prompts takes n = 1 and no stream", "prompt")
    if len(body.prompt) > settings.max_batch_size:
        raise ClientError(422, f"{len(body.prompt)} prompts in one request; the limit is --max_batch_size "
                               f"{settings.max_batch_size}", "prompt")

    def prepare(ids: list[int]) -> GenerationJob:
        job = openai_job(prompt_token_ids(ids, served.tokenizer, settings), body, settings, body.max_tokens, served)
        job.logprobs = spec
        return job

    jobs = [await server.off_loop(prepare, ids) for ids in body.prompt]
    outputs = await asyncio.gather(*(server.run(job, served, None) for job in jobs))  # one disconnect watch cannot serve many
    choices = []
    for index, (job, output) in enumerate(zip(jobs, outputs, strict=True)):
        for choice in completion_choices(body, output, job.prompt_ids, served.tokenizer.decode(job.prompt_ids),
                                         served.tokenizer):
            choices.append({**choice, "index": index})
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    generated = sum(output.completion_tokens for output in outputs)
    answer = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
              "model": served.name, "choices": choices,
              "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}}
    return json_body(answer)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    server = _server(request)
    settings = server.settings
    served = server.served(body.model)
    field_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"

    def prepare() -> GenerationJob:
        ids = chat_prompt_ids(body.messages, served, settings)
        job = openai_job(ids, body, settings, body.max_completion_tokens or body.max_tokens, served, field_name, "messages")
        job.logprobs = spec
        return job

    spec = chat_spec(body, settings)
    if spec is not None and body.stream:
        raise ClientError(422, "stream with logprobs is not supported; ask without stream", "stream")
    job = await server.off_loop(prepare)

    def shape(output: GenerationOutput) -> list[dict]:
        return [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                 "logprobs": chat_logprobs(output, i, served.tokenizer, bool(body.return_tokens_as_token_ids))}
                for i, (text, reason) in enumerate(zip(output.texts, output.finish_reasons, strict=True))]

    return await _respond(server, job, served, body.stream, "chat.completion", chat=True, request=request, shape=shape)


async def _respond(server: Server, job: GenerationJob, served: ServedModel, stream: bool | None, kind: str, chat: bool,
                   request: Request, shape: Callable[[GenerationOutput], list[dict]] | None = None) -> Any:
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if stream:
        return _stream(server, job, served, ident, created, chat)
    output = await server.run(job, served, request)
    if shape is not None:
        choices = shape(output)
    elif chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
                   for i, (text, reason) in enumerate(zip(output.texts, output.finish_reasons, strict=True))]
    else:
        choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                   for i, (text, reason) in enumerate(zip(output.texts, output.finish_reasons, strict=True))]
    usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": output.completion_tokens,
             "total_tokens": len(job.prompt_ids) + output.completion_tokens}
    return {"id": ident, "object": kind, "created": created, "model": served.name, "choices": choices, "usage": usage}


def _stream(server: Server, job: GenerationJob, served: ServedModel, ident: str, created: int, chat: bool) -> StreamingResponse:
    server.admit()  # a refusal is a real HTTP 429, not a 200 with an error event
    pieces: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job.stream = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        body = {"id": ident, "object": kind, "created": created, "model": served.name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    released = False

    def release_once() -> None:
        nonlocal released
        if not released:
            released = True
            server.release()

    async def events() -> AsyncIterator[str]:
        task = asyncio.create_task(server.generate(job, served, None))
        try:
            if chat:
                yield chunk(None, None, first=True)
            while not task.done() or not pieces.empty():
                getter = asyncio.ensure_future(pieces.get())  # no polling: wake on a piece or on the end
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield chunk(getter.result(), None)
                else:
                    getter.cancel()
            output = await task
            yield chunk(None if chat else "", output.finish_reasons[0])
        except ClientError as exc:
            yield f"data: {json.dumps({'error': {'type': exc.kind, 'message': exc.message, 'field': exc.field}})}\n\n"
        finally:
            if not task.done():
                job.cancelled = True
                task.cancel()
            release_once()
        yield "data: [DONE]\n\n"

    return _SlotStreamingResponse(events(), release_once)


def create_app(settings: ServerSettings, loader: Loader | None = None,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    server = Server(settings, loader or default_loader, on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=server.load, name="nlm-model-loader", daemon=True).start()
        yield
        server.stop()

    app = FastAPI(title="nlm", version="1", lifespan=lifespan,
                  description="Serves a distilled student: SageMaker /invocations and OpenAI-compatible /v1 routes.")
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key,
                       metrics=server.metrics)
    app.state.nlm = server
    _add_error_handlers(app)
    app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        if error.get("type") in ("json_invalid", "json_type"):
            return _error(400, "invalid_json", "request body is not valid JSON", None)
        if error.get("type") == "model_attributes_type":
            return _error(422, "invalid_request", "request body must be a JSON object", None)
        if error.get("type") == "extra_forbidden":
            unknown = [".".join(str(p) for p in e["loc"] if p != "body") for e in exc.errors() if e["type"] == "extra_forbidden"]
            return _error(422, "unknown_field", f"unknown field(s): {', '.join(unknown)}", unknown[0])
        return _error(422, "invalid_request", f"{field or 'body'}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}", field)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return _error(exc.status, exc.kind, exc.message, exc.field)

    @app.exception_handler(WorkerStopped)
    async def _worker_stopped(request: Request, exc: WorkerStopped) -> JSONResponse:
        return _error(503, "unavailable", f"{exc}; restart the server")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", "the server failed while handling this request")
