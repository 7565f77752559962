"""The HTTP app: SageMaker's /ping and /invocations, OpenAI-compatible /v1 routes, Prometheus /metrics.

The model loads in a background thread when the app starts, so /ping answers 503 until it is loaded and
warmed up. Every error is JSON `{"error": {"type", "message", "field"}}`; nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from nlm.inference.engine import GenerationEngine, GenerationJob, GenerationOutput
from nlm.inference.jobs import ClientError, clean_prompt, encode_prompt, invocation_job, openai_job
from nlm.inference.metrics import ServerMetrics
from nlm.inference.middleware import GuardMiddleware
from nlm.inference.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    InvocationRequest,
    InvocationResponse,
)
from nlm.inference.settings import ServerSettings

logger = logging.getLogger("nlm.serve")

Loader = Callable[[ServerSettings], tuple[Any, Any]]  # -> (model, tokenizer)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422, 429, 503, 504)}


@dataclass
class ServerState:
    engine: GenerationEngine | None = None
    tokenizer: Any = None
    separator: str = ""
    ready: bool = False
    failure: str | None = None
    in_flight: int = 0


def default_loader(settings: ServerSettings) -> tuple[Any, Any]:
    from nlm.models.device import select_device
    from nlm.models.loading import load_tokenizer, load_trained_model

    device = select_device(forced=settings.device) if settings.device else select_device()
    tokenizer = load_tokenizer(str(settings.model), trust_remote_code=settings.trust_remote_code)
    model = load_trained_model(settings.model, device=device, trust_remote_code=settings.trust_remote_code,
                               allow_pickle=settings.allow_pickle)
    return model, tokenizer


def _error(status: int, kind: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "field": field}}, status_code=status)


def create_app(settings: ServerSettings, loader: Loader = default_loader,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    metrics = ServerMetrics()
    state = ServerState()

    def load() -> None:
        try:
            from nlm.models.model_info import prompt_separator

            model, tokenizer = loader(settings)
            engine = GenerationEngine(model, tokenizer, max_batch_size=settings.max_batch_size,
                                      batch_window_ms=settings.batch_window_ms, observe_batch=metrics.batch_size.observe)
            engine.warm_up()
            engine.start()
            state.tokenizer, state.engine = tokenizer, engine
            state.separator = settings.prompt_separator if settings.prompt_separator is not None else prompt_separator(settings.model)
            state.ready = True
            logger.info("model %s loaded and warmed up; serving", settings.model)
        except Exception as exc:  # noqa: BLE001 - reported through /ping and the exit code
            state.failure = f"{type(exc).__name__}: {exc}"
            logger.error("model could not be loaded: %s", state.failure)
            if on_load_failure is not None:
                on_load_failure(state.failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="nlm-model-loader", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="nlm", version="1", lifespan=lifespan,
                  description="Serves a distilled student: SageMaker /invocations and OpenAI-compatible /v1 routes.")
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key, metrics=metrics)
    app.state.nlm = state

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", "the server failed while handling this request")

    def _ready() -> tuple[GenerationEngine, Any]:
        if not state.ready or state.engine is None:
            raise ClientError(503, "the model is still loading" if state.failure is None else "the model failed to load",
                              kind="unavailable")
        return state.engine, state.tokenizer

    async def _run(job: GenerationJob) -> GenerationOutput:
        engine, _ = _ready()
        if state.in_flight >= settings.max_concurrent_requests:
            raise ClientError(429, f"the server is at its limit of {settings.max_concurrent_requests} concurrent requests; retry later",
                              kind="rate_limited")
        state.in_flight += 1
        metrics.in_flight.set(state.in_flight)
        metrics.queue_depth.set(engine.queue_depth + 1)
        metrics.prompt_tokens.inc(len(job.prompt_ids))
        try:
            output = await asyncio.wait_for(engine.generate(job), timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ClientError(504, f"generation took longer than {settings.request_timeout_s:g} s", kind="timeout") from None
        finally:
            state.in_flight -= 1
            metrics.in_flight.set(state.in_flight)
            metrics.queue_depth.set(engine.queue_depth)
        metrics.generated_tokens.inc(output.completion_tokens)
        return output

    @app.get("/ping", responses={503: {"model": ErrorResponse}})
    async def ping() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "healthy"})
        status = "failed" if state.failure else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        if state.engine is not None:
            metrics.queue_depth.set(state.engine.queue_depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/invocations", response_model=InvocationResponse, responses=ERRORS)
    async def invocations(body: InvocationRequest) -> InvocationResponse:
        _, tokenizer = _ready()
        job, used, prompt = invocation_job(body, tokenizer, settings, state.separator)
        logger.debug("invocation prompt=%r", prompt)
        output = await _run(job)
        logger.debug("invocation responses=%r", output.texts)
        return InvocationResponse(responses=output.texts, input_prompt=prompt, generation_config=used)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "nlm"}]}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest) -> Any:
        _, tokenizer = _ready()
        prompt = clean_prompt(body.prompt, settings)
        job = openai_job(encode_prompt(tokenizer, prompt, settings), body, settings, body.max_tokens)
        return await _respond(job, body.stream, "text_completion", chat=False)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        _, tokenizer = _ready()
        if not getattr(tokenizer, "chat_template", None):
            raise ClientError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": clean_prompt(m.content, settings, f"messages.{i}.content") if m.role == "user"
                     else m.content} for i, m in enumerate(body.messages)]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = encode_prompt(tokenizer, text, settings, "messages", special=False)
        job = openai_job(ids, body, settings, body.max_completion_tokens or body.max_tokens)
        return await _respond(job, body.stream, "chat.completion", chat=True)

    async def _respond(job: GenerationJob, stream: bool | None, kind: str, chat: bool) -> Any:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            return _stream(job, ident, created, chat)
        output = await _run(job)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
                       for i, (text, reason) in enumerate(zip(output.texts, output.finish_reasons, strict=True))]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                       for i, (text, reason) in enumerate(zip(output.texts, output.finish_reasons, strict=True))]
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": output.completion_tokens,
                 "total_tokens": len(job.prompt_ids) + output.completion_tokens}
        return {"id": ident, "object": kind, "created": created, "model": settings.model_name, "choices": choices, "usage": usage}

    def _stream(job: GenerationJob, ident: str, created: int, chat: bool) -> StreamingResponse:
        _ready()
        if state.in_flight >= settings.max_concurrent_requests:
            raise ClientError(429, f"the server is at its limit of {settings.max_concurrent_requests} concurrent requests; retry later",
                              kind="rate_limited")
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
            body = {"id": ident, "object": kind, "created": created, "model": settings.model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            task = asyncio.create_task(_run(job))
            if chat:
                yield chunk(None, None, first=True)
            try:
                while not task.done() or not pieces.empty():
                    try:
                        text = await asyncio.wait_for(pieces.get(), timeout=0.05)
                    except asyncio.TimeoutError:
                        continue
                    yield chunk(text, None)
                output = await task
                yield chunk(None if chat else "", output.finish_reasons[0])
            except ClientError as exc:
                yield f"data: {json.dumps({'error': {'type': exc.kind, 'message': exc.message, 'field': exc.field}})}\n\n"
            finally:
                if not task.done():
                    job.cancelled = True
                    task.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
