"""Serve a trained model over HTTP (SageMaker and OpenAI-compatible).

Every option is also an NLM_SERVE__<OPTION> environment variable or a key of the YAML file given with --config.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from nlm.inference.settings import ServerSettings

# Flag names users already call where the settings field says its unit.
_FLAG_NAMES = {"request_timeout_s": "request_timeout", "graceful_shutdown_s": "graceful_shutdown"}
_NOT_FLAGS = {"api_key"}  # a secret: its value comes from the variable named by --api_key_env, never a flag


class _ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key_env: str | None = Field(
        None, description="require 'Authorization: Bearer $NAME' on every route but /ping, NAME being this variable")


def _server_fields() -> dict[str, tuple[object, object]]:
    fields: dict[str, tuple[object, object]] = {}
    for name, info in ServerSettings.__pydantic_fields__.items():
        if name in _NOT_FLAGS:
            continue
        annotation = Literal["cuda", "mps", "cpu"] | None if name == "device" else info.annotation
        fields[_FLAG_NAMES.get(name, name)] = (annotation, copy.copy(info))
    return fields


# The options are ServerSettings' fields (their help and ranges live there), under their flag names.
Options = create_model("Options", __base__=_ServeOptions, __module__=__name__, **_server_fields())  # type: ignore[call-overload]


def run(options: Options) -> int:  # type: ignore[valid-type]
    import os

    from nlm.config.logging_setup import register_secret
    from nlm.errors import ConfigError
    from nlm.inference.server import serve

    values = options.model_dump()  # type: ignore[attr-defined]
    key_variable = values.pop("api_key_env")
    for field, flag in _FLAG_NAMES.items():
        values[field] = values.pop(flag)
    api_key = None
    if key_variable:
        api_key = os.environ.get(key_variable)
        if not api_key:
            raise ConfigError(f"--api_key_env {key_variable}: that environment variable is not set or empty")
        register_secret(api_key)
    serve(ServerSettings(**values, api_key=api_key))
    return 0
