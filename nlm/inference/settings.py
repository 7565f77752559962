"""Server settings: what `nlm serve` flags set. Limits here are the caps requests are validated against.

A pydantic dataclass: each field's description and range are the help text and checks of `nlm serve`'s flags
(`nlm/commands/serve.py` derives its options from these fields).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from nlm.errors import ConfigError

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


def parse_model_specs(values: list[str], served_model_name: str | None = None) -> tuple[tuple[str, Path], ...]:
    """`--model` values -> (name, folder) pairs. `name=PATH` names a model; a bare PATH is named after its folder
    (or `--served_model_name` when it is the only model)."""
    specs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and _NAME.match(name) and not Path(value).exists():
            specs.append((name, Path(rest)))
        else:
            path = Path(value)
            default = served_model_name if served_model_name and len(values) == 1 else (path.name or "model")
            specs.append((default, path))
    names = [name for name, _ in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"--model: the name {duplicates[0]!r} is used twice; give each model its own name (--model NAME=PATH)")
    return tuple(specs)


VLLM_PYTHON_ENV = "NLM_VLLM_PYTHON"  # a Python with vLLM installed (its own venv) that runs vLLM's server


@dataclass(frozen=True)
class ServerSettings:
    model: Path = Field(SAGEMAKER_MODEL_DIR, description="model folder (full, merged or LoRA adapter)")
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the server to the network")
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    served_model_name: str | None = Field(None, description="model id shown by /v1/models (default: the folder name)")
    api_key: str | None = None  # the value, read from the environment variable named by --api_key_env
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together per model (continuous batching)")
    batch_window_ms: float = Field(
        10.0, ge=0, description="when the worker is idle under concurrent traffic: how long the first arrival waits for company")
    max_concurrent_requests: int = Field(64, ge=1, description="beyond this: 429 at once")
    request_timeout_s: float = Field(60.0, gt=0, description="seconds before a 504")
    max_body_bytes: int = Field(1024 * 1024, ge=1, description="larger request bodies get a 413")
    max_new_tokens_cap: int = Field(512, ge=1, description="most tokens a request may ask for")
    default_max_new_tokens: int = Field(64, ge=1, description="tokens generated when a request does not say")
    max_return_sequences: int = Field(4, ge=1, description="most sequences per prompt")
    max_prompt_chars: int = Field(32_000, ge=1, description="longer prompts get a 400")
    max_prompt_tokens: int = Field(2048, ge=1, description="longer prompts (in tokens) get a 400")
    max_logprobs: int = Field(20, ge=0, description="most top log-probs a request may ask per token (logprobs, "
                                                    "prompt_logprobs, top_logprobs); more is a 422")
    prompt_separator: str | None = Field(
        None, description="appended to /invocations prompts (default: the model's training separator)")
    device: str | None = Field(None, description="force one device: cuda, mps or cpu")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) weights")
    graceful_shutdown_s: float = Field(30.0, gt=0, description="seconds to finish in-flight requests")
    # Speculative decoding (issue 27): a draft model sharing the served model's tokenizer.
    draft: Path | None = Field(None, description="draft model folder for speculative decoding of the served model "
                                                 "(greedy requests decoded alone; same tokenizer)")
    num_assistant_tokens: int = Field(5, ge=1, le=64, description="tokens the draft proposes per verify step (--draft)")
    # Several models in one server (issue 17): (name, folder) pairs from repeated `--model NAME=PATH`.
    # Empty: the one model in `model`, named `model_name`. The first pair is the default model.
    models: tuple[tuple[str, Path], ...] = Field((), description="served models as (name, folder) pairs; the first is the default")
    # The generation engine (issue 28): nlm's own continuous batcher, or vLLM's server behind nlm's routes.
    engine: Literal["nlm", "vllm"] = Field("nlm", description="generation engine: nlm (in process) or vllm (vLLM's "
                                           "server as a managed child process behind nlm's routes)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name or "model"

    @property
    def served_models(self) -> tuple[tuple[str, Path], ...]:
        """Every (name, folder) this server answers for, the default one first."""
        return self.models or ((self.model_name, self.model),)
