"""Run the app under uvicorn: bind, serve, and on SIGTERM stop accepting, finish in-flight requests, exit 0."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from nlm.errors import ConfigError, NlmError
from nlm.inference.settings import ServerSettings

logger = logging.getLogger("nlm.serve")


class ModelLoadFailed(NlmError):
    """The model could not be loaded after the server started."""


def serve(settings: ServerSettings, loader: Any = None) -> None:
    """Serve until SIGTERM. `loader` replaces the default model loading (tests inject faults through it)."""
    import uvicorn

    from nlm.inference.app import create_app, default_loader

    for _name, path in settings.served_models:
        if not path.exists():
            raise ConfigError(f"model folder {path} not found (pass --model PATH or --model NAME=PATH; SageMaker mounts /opt/ml/model)")
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines%s", settings.host,
                       "" if settings.api_key else " and no API key is set (--api_key_env)")
    failure: dict[str, str] = {}
    server: uvicorn.Server | None = None

    def stop_on_failure(message: str) -> None:
        failure["message"] = message
        if server is not None:
            server.should_exit = True

    app = create_app(settings, loader=loader or default_loader, on_load_failure=stop_on_failure)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s), lifespan="on",
    )
    server = uvicorn.Server(config)
    logger.info("serving %s on http://%s:%d", ", ".join(f"{n}={p}" for n, p in settings.served_models), settings.host, settings.port)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found. A handler
    # that only logs makes that re-raise harmless, so a clean shutdown exits 0 as orchestrators expect.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: logger.info("SIGTERM: in-flight requests finished; exiting"))
    server.run()
    if failure:
        raise ModelLoadFailed(f"model {settings.model} could not be loaded: {failure['message']}")
