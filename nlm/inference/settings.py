"""Server settings: what `nlm serve` flags set. Limits here are the caps requests are validated against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


@dataclass(frozen=True)
class ServerSettings:
    model: Path = SAGEMAKER_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str | None = None
    api_key: str | None = None  # the value, read from the environment variable named by --api_key_env
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_concurrent_requests: int = 64
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1024 * 1024
    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 64
    max_return_sequences: int = 4
    max_prompt_chars: int = 32_000
    max_prompt_tokens: int = 2048
    prompt_separator: str | None = None  # appended to /invocations prompts; None: the model's training separator
    device: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    graceful_shutdown_s: float = 30.0

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name or "model"
