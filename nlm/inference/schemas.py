"""Request and response bodies: the SageMaker `/invocations` contract and the OpenAI-compatible routes.

Static ranges live here; limits that are server settings or model properties (token caps, context) are checked
in `jobs.py`.
Unknown fields are rejected (`extra="forbid"`), so a typo never silently changes generation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_stop(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if len(stops) > 4:
        raise ValueError("at most 4 stop strings")
    if any(stop == "" for stop in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class InvocationRequest(_Strict):
    """POST /invocations. `max_length` keeps the transformers meaning: prompt tokens + new tokens."""

    prompt: str = Field(..., description="Text to complete; control characters other than newline and tab are removed.")
    model: str | None = Field(None, description="Which served model answers (GET /v1/models lists them); default: the first.")
    max_length: int | None = Field(None, ge=1, description="Prompt plus new tokens (transformers' meaning).")
    max_new_tokens: int | None = Field(None, ge=1, description="New tokens to generate; wins over max_length.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool | None = Field(None, description="Sample instead of greedy; implied by temperature > 0.")
    num_return_sequences: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: list[str] | None = Field(None, description="Up to 4 strings; the output is cut before the first one.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: str | list[str] | None) -> list[str] | None:
        return _check_stop(value)


class InvocationResponse(BaseModel):
    responses: list[str]
    input_prompt: str
    generation_config: dict


class _OpenAIRequest(_Strict):
    """Fields shared by the OpenAI completion routes. Fields OpenAI clients may send but nlm does not implement
    are accepted only with their neutral value."""

    model: str | None = Field(None, description="Which served model answers; default: the first one.")
    temperature: float | None = Field(None, ge=0, le=2, description="Default: the model's generation_config, else 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default: the model's generation_config, else 1.")
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    presence_penalty: Literal[0, 0.0] | None = 0
    frequency_penalty: Literal[0, 0.0] | None = 0
    logit_bias: None = None
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: str | list[str] | None) -> list[str] | None:
        return _check_stop(value)


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions (OpenAI)."""

    prompt: str | list[int] | list[list[int]] = Field(
        ..., description="Text, token ids (scored as given, no special tokens added), or a list of token-id prompts "
                         "(one choice each, in order).")
    max_tokens: int | None = Field(16, ge=0, description="0 with echo or prompt_logprobs: score the prompt, generate nothing.")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, description="Top log-probs per token (at most the server's --max_logprobs).")
    best_of: Literal[1] | None = 1
    suffix: None = None
    # vLLM's extensions, in vLLM's response shape.
    prompt_logprobs: int | None = Field(None, ge=0, description="Top log-probs of every prompt token (vLLM's extension).")
    return_tokens_as_token_ids: bool | None = Field(None, description='Tokens as "token_id:123" strings (vLLM\'s extension).')
    # nlm's extension: log-probs of softmax(logits / T) instead of the model's own (T = 1) distribution.
    logprobs_temperature: float | None = Field(None, gt=0, le=100, description="nlm extension: temperature of the returned log-probs.")
    # nlm's extension: prompt log-probs as flat arrays (`nlm_prompt_logprobs`) instead of one object per token.
    nlm_format: Literal["vllm", "arrays"] | None = Field(
        None, description='nlm extension: "arrays" returns prompt_logprobs as flat arrays in `nlm_prompt_logprobs` '
                          "(needs prompt_logprobs and max_tokens 0); default: vLLM's shape.")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_OpenAIRequest):
    """POST /v1/chat/completions (OpenAI)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, description="Top log-probs per generated token (needs logprobs: true).")
    return_tokens_as_token_ids: bool | None = None


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
