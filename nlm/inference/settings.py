"""Server settings: what `nlm serve` flags set. Limits here are the caps requests are validated against.

A pydantic dataclass: each field's description and range are the help text and checks of `nlm serve`'s flags
(`nlm/commands/serve.py` derives its options from these fields).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic.dataclasses import dataclass

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


@dataclass(frozen=True)
class ServerSettings:
    model: Path = Field(SAGEMAKER_MODEL_DIR, description="model folder (full, merged or LoRA adapter)")
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the server to the network")
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    served_model_name: str | None = Field(None, description="model id shown by /v1/models (default: the folder name)")
    api_key: str | None = None  # the value, read from the environment variable named by --api_key_env
    max_batch_size: int = Field(8, ge=1, description="requests sharing one generate call")
    batch_window_ms: float = Field(10.0, ge=0, description="how long the batcher waits for company")
    max_concurrent_requests: int = Field(64, ge=1, description="beyond this: 429 at once")
    request_timeout_s: float = Field(60.0, gt=0, description="seconds before a 504")
    max_body_bytes: int = Field(1024 * 1024, ge=1, description="larger request bodies get a 413")
    max_new_tokens_cap: int = Field(512, ge=1, description="most tokens a request may ask for")
    default_max_new_tokens: int = Field(64, ge=1, description="tokens generated when a request does not say")
    max_return_sequences: int = Field(4, ge=1, description="most sequences per prompt")
    max_prompt_chars: int = Field(32_000, ge=1, description="longer prompts get a 400")
    max_prompt_tokens: int = Field(2048, ge=1, description="longer prompts (in tokens) get a 400")
    prompt_separator: str | None = Field(
        None, description="appended to /invocations prompts (default: the model's training separator)")
    device: str | None = Field(None, description="force one device: cuda, mps or cpu")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) weights")
    graceful_shutdown_s: float = Field(30.0, gt=0, description="seconds to finish in-flight requests")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name or "model"
