"""Validated request bodies -> generation jobs: prompt cleaning, server caps, and the settings actually used."""

from __future__ import annotations

import re
from typing import Any

from nlm.inference.engine import GenerationJob, SamplingKey
from nlm.inference.settings import ServerSettings

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything below 0x20 but tab (0x09) and newline (0x0a)


class ClientError(Exception):
    """Something the client sent is not acceptable; becomes a JSON error with `status`."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def clean_prompt(prompt: str, settings: ServerSettings, field: str = "prompt") -> str:
    cleaned = _CONTROL.sub("", prompt)
    if not cleaned.strip():
        raise ClientError(422, "prompt is empty (after removing control characters and whitespace)", field)
    if len(cleaned) > settings.max_prompt_chars:
        raise ClientError(422, f"prompt has {len(cleaned)} characters; the limit is {settings.max_prompt_chars}", field)
    return cleaned


def encode_prompt(tokenizer: Any, text: str, settings: ServerSettings, field: str = "prompt", special: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if len(ids) > settings.max_prompt_tokens:
        raise ClientError(422, f"prompt has {len(ids)} tokens; the limit is {settings.max_prompt_tokens}", field)
    if not ids:
        raise ClientError(422, "prompt encodes to no token", field)
    return ids


def _check_new_tokens(value: int, settings: ServerSettings, field: str) -> int:
    if value > settings.max_new_tokens_cap:
        raise ClientError(422, f"{field} = {value} is over this server's cap of {settings.max_new_tokens_cap}", field)
    return value


def sampling_key(temperature: float | None, top_p: float | None, top_k: int | None, do_sample: bool | None,
                 repetition_penalty: float | None, n: int, settings: ServerSettings, n_field: str) -> SamplingKey:
    if n > settings.max_return_sequences:
        raise ClientError(422, f"{n_field} = {n} is over this server's cap of {settings.max_return_sequences}", n_field)
    greedy = temperature == 0 or (do_sample is False) or (do_sample is None and temperature is None)
    if greedy and n > 1:
        raise ClientError(422, f"{n_field} > 1 needs sampling (temperature > 0); greedy decoding gives one answer", n_field)
    return SamplingKey(
        do_sample=not greedy,
        temperature=float(temperature if temperature not in (None, 0) else 1.0),
        top_p=float(top_p if top_p is not None else 1.0),
        top_k=int(top_k if top_k is not None else 0),
        repetition_penalty=float(repetition_penalty if repetition_penalty is not None else 1.0),
        num_return_sequences=n,
    )


def invocation_job(body: Any, tokenizer: Any, settings: ServerSettings, separator: str) -> tuple[GenerationJob, dict, str]:
    """The job for POST /invocations, the generation_config to echo, and the cleaned prompt."""
    prompt = clean_prompt(body.prompt, settings)
    ids = encode_prompt(tokenizer, prompt + separator, settings)
    if body.max_new_tokens is not None:
        new_tokens = _check_new_tokens(body.max_new_tokens, settings, "max_new_tokens")
    elif body.max_length is not None:
        new_tokens = body.max_length - len(ids)
        if new_tokens < 1:
            raise ClientError(422, f"max_length = {body.max_length} leaves no room: the prompt alone has {len(ids)} tokens "
                                   "(max_length counts prompt plus new tokens)", "max_length")
        _check_new_tokens(new_tokens, settings, "max_length")
    else:
        new_tokens = settings.default_max_new_tokens
    n = body.num_return_sequences or 1
    key = sampling_key(body.temperature, body.top_p, body.top_k, body.do_sample, body.repetition_penalty, n, settings,
                       "num_return_sequences")
    job = GenerationJob(ids, new_tokens, key, stop=body.stop or [], seed=body.seed)
    used = {
        "max_new_tokens": new_tokens, "max_length": len(ids) + new_tokens, "prompt_tokens": len(ids),
        "do_sample": key.do_sample, "temperature": key.temperature if key.do_sample else 0.0,
        "top_p": key.top_p, "top_k": key.top_k, "repetition_penalty": key.repetition_penalty,
        "num_return_sequences": n, "stop": body.stop or [], "seed": body.seed,
    }
    return job, used, prompt


def openai_job(prompt_ids: list[int], body: Any, settings: ServerSettings, max_tokens: int | None) -> GenerationJob:
    n = body.n or 1
    if body.stream and n > 1:
        raise ClientError(422, "stream with n > 1 is not supported", "n")
    new_tokens = _check_new_tokens(max_tokens or settings.default_max_new_tokens, settings, "max_tokens")
    key = sampling_key(body.temperature, body.top_p, None, None, None, n, settings, "n")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return GenerationJob(prompt_ids, new_tokens, key, stop=stop, seed=body.seed)
