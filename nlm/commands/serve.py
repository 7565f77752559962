"""Serve a trained model over HTTP (SageMaker and OpenAI-compatible).

Every option is also an NLM_SERVE__<OPTION> environment variable or a key of the YAML file given with --config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from nlm.inference.settings import SAGEMAKER_MODEL_DIR, ServerSettings

# Flag names users already call where the settings field says its unit.
_FLAG_NAMES = {"request_timeout_s": "request_timeout", "graceful_shutdown_s": "graceful_shutdown"}
_NOT_FLAGS = {"api_key", "models"}  # api_key: a secret, read from the variable --api_key_env names; models: from --model


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
        if name == "model":  # repeatable: several models in one server, each `NAME=PATH` or a bare PATH
            # A YAML file or NLM_SERVE__MODEL may give one folder as a plain string.
            one_or_many = Annotated[list[str], BeforeValidator(lambda v: [str(v)] if isinstance(v, (str, Path)) else v)]
            fields[name] = (one_or_many, Field(default_factory=list, description=(
                f"model folder (full, merged or LoRA adapter); repeat as NAME=PATH to serve several models, the first "
                f"being the default (default: {SAGEMAKER_MODEL_DIR})")))
            continue
        if name == "engine":  # unset: chosen by what is installed (nlm.inference.engines.default_engine)
            fields[name] = (Literal["nlm", "vllm"] | None, Field(None, description=(
                "generation engine: vllm (vLLM's OpenAI server as a child process, nlm's routes and limits in front) "
                "or nlm (nlm's own continuous batcher, in process); default: vllm when vLLM is importable or "
                "NLM_VLLM_PYTHON names a Python that has it, else nlm")))
            continue
        fields[_FLAG_NAMES.get(name, name)] = (annotation, copy.copy(info))
    return fields


# The options are ServerSettings' fields (their help and ranges live there), under their flag names.
Options = create_model("Options", __base__=_ServeOptions, __module__=__name__, **_server_fields())  # type: ignore[call-overload]


def run(options: Options) -> int:  # type: ignore[valid-type]
    import os

    from nlm.config.logging_setup import register_secret
    from nlm.errors import ConfigError
    from nlm.inference.server import serve
    from nlm.inference.settings import parse_model_specs

    values = options.model_dump()  # type: ignore[attr-defined]
    specs = parse_model_specs([str(m) for m in values.pop("model")] or [str(SAGEMAKER_MODEL_DIR)], values["served_model_name"])
    values["model"], values["models"] = specs[0][1], specs
    if values["engine"] is None:
        from nlm.inference.engines import default_engine

        values["engine"] = default_engine()
    key_variable = values.pop("api_key_env")
    for field, flag in _FLAG_NAMES.items():
        values[field] = values.pop(flag)
    api_key = None
    if key_variable:
        api_key = os.environ.get(key_variable)
        if not api_key:
            raise ConfigError(f"--api_key_env {key_variable}: that environment variable is not set or empty")
        register_secret(api_key)
    settings = ServerSettings(**values, api_key=api_key)
    paths = [path for _name, path in settings.served_models]
    if all(path.exists() for path in paths):  # a missing one is reported by serve(), naming it
        from nlm.models.loading import check_model_path

        for path in paths:  # a run folder, a cache or a file: say so before the server starts
            check_model_path(path)
    if settings.draft is not None:  # a draft that cannot load fails here, not after the server started
        from nlm.models.loading import check_model_path

        if not settings.draft.exists():
            raise ConfigError(f"--draft {settings.draft}: no such folder (expected a model folder sharing the served "
                              "model's tokenizer)")
        check_model_path(settings.draft)
    serve(settings)
    return 0
