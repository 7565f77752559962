"""Checks that run before any route: body size, content type, API key; and per-request metrics.

Pure ASGI middleware, so an oversized body is refused from its Content-Length (or as soon as the streamed
bytes pass the cap) without being read whole.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from nlm.inference.metrics import ServerMetrics

KNOWN_ROUTES = ("/ping", "/metrics", "/invocations", "/v1/models", "/v1/completions", "/v1/chat/completions",
                "/openapi.json", "/docs")
JSON_ROUTES = ("/invocations", "/v1/completions", "/v1/chat/completions")


def error_body(status: int, kind: str, message: str, field: str | None = None) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"type": kind, "message": message, "field": field}}).encode()


async def send_json(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """413 for bodies over the cap, 415 for non-JSON posts, 401 without the API key (except /ping)."""

    def __init__(self, app: Any, *, max_body_bytes: int, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status_seen = {"status": 500}

        async def send_recording(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await send_json(send_recording, *refusal, headers=[(b"www-authenticate", b"Bearer")] if refusal[0] == 401 else None)
                return
            if scope.get("method") == "POST":
                body = await self._read_capped(receive)
                if body is None:
                    await send_json(send_recording, *error_body(413, "payload_too_large",
                                                                 f"request body is over {self.max_body_bytes} bytes"))
                    return
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_recording)
        finally:
            self.metrics.requests.labels(route, str(status_seen["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope: dict, path: str) -> tuple[int, bytes] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and path != "/ping":
            supplied = headers.get("authorization", "")
            scheme, _, token = supplied.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                return error_body(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
        if scope.get("method") == "POST" and path in JSON_ROUTES:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return error_body(413, "payload_too_large", f"request body is over {self.max_body_bytes} bytes")
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return error_body(415, "unsupported_media_type",
                                  f"expected Content-Type: application/json, got {media_type or 'none'}")
        return None

    async def _read_capped(self, receive: Any) -> bytes | None:
        """The whole body, or None as soon as it passes the cap (the rest is never read)."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
