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


def fit_context(prompt_tokens: int, new_tokens: int | None, default: int, context: int | None, field: str,
                prompt_field: str = "prompt") -> int:
    """The new-token budget, checked against the model's context before admission (as vLLM does): a request
    that names a budget over the context is refused naming the limit; a default budget shrinks to fit."""
    if context is None:
        return new_tokens if new_tokens is not None else default
    if prompt_tokens >= context:
        raise ClientError(422, f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens, "
                               "so no token could be generated", prompt_field)
    if new_tokens is None:
        return min(default, context - prompt_tokens)
    if prompt_tokens + new_tokens > context:
        raise ClientError(422, f"{field} = {new_tokens} plus the prompt's {prompt_tokens} tokens is {prompt_tokens + new_tokens}, "
                               f"over this model's context of {context} tokens (at most {context - prompt_tokens} new tokens)", field)
    return new_tokens


def sampling_key(temperature: float | None, top_p: float | None, top_k: int | None, do_sample: bool | None,
                 repetition_penalty: float | None, n: int, settings: ServerSettings, n_field: str,
                 defaults: dict[str, Any] | None = None, openai: bool = False) -> SamplingKey:
    """Values the request leaves out come from the model's generation_config (`defaults`), then from the
    route's own defaults: OpenAI's (temperature 1, top_p 1) on /v1, transformers' (greedy) on /invocations."""
    if n > settings.max_return_sequences:
        raise ClientError(422, f"{n_field} = {n} is over this server's cap of {settings.max_return_sequences}", n_field)
    defaults = defaults or {}
    temperature = temperature if temperature is not None else defaults.get("temperature", 1.0 if openai else None)
    top_p = top_p if top_p is not None else defaults.get("top_p")
    top_k = top_k if top_k is not None else defaults.get("top_k")
    repetition_penalty = repetition_penalty if repetition_penalty is not None else defaults.get("repetition_penalty")
    if openai:
        greedy = temperature == 0
    else:
        do_sample = do_sample if do_sample is not None else defaults.get("do_sample")
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


def invocation_job(body: Any, served: Any, settings: ServerSettings) -> tuple[GenerationJob, dict, str]:
    """The job for POST /invocations, the generation_config to echo, and the cleaned prompt (`served`: a
    registry.ServedModel). Runs in a worker thread: tokenising a long prompt must not block the event loop."""
    prompt = clean_prompt(body.prompt, settings)
    ids = encode_prompt(served.tokenizer, prompt + served.separator, settings)
    if body.max_new_tokens is not None:
        new_tokens = fit_context(len(ids), _check_new_tokens(body.max_new_tokens, settings, "max_new_tokens"),
                                 settings.default_max_new_tokens, served.context, "max_new_tokens")
    elif body.max_length is not None:
        new_tokens = body.max_length - len(ids)
        if new_tokens < 1:
            raise ClientError(422, f"max_length = {body.max_length} leaves no room: the prompt alone has {len(ids)} tokens "
                                   "(max_length counts prompt plus new tokens)", "max_length")
        _check_new_tokens(new_tokens, settings, "max_length")
        new_tokens = fit_context(len(ids), new_tokens, settings.default_max_new_tokens, served.context, "max_length")
    else:
        new_tokens = fit_context(len(ids), None, settings.default_max_new_tokens, served.context, "max_new_tokens")
    n = body.num_return_sequences or 1
    key = sampling_key(body.temperature, body.top_p, body.top_k, body.do_sample, body.repetition_penalty, n, settings,
                       "num_return_sequences", served.sampling_defaults)
    job = GenerationJob(ids, new_tokens, key, stop=body.stop or [], seed=body.seed, adapter=served.adapter)
    used = {
        "max_new_tokens": new_tokens, "max_length": len(ids) + new_tokens, "prompt_tokens": len(ids),
        "do_sample": key.do_sample, "temperature": key.temperature if key.do_sample else 0.0,
        "top_p": key.top_p, "top_k": key.top_k, "repetition_penalty": key.repetition_penalty,
        "num_return_sequences": n, "stop": body.stop or [], "seed": body.seed,
    }
    return job, used, prompt


def openai_job(prompt_ids: list[int], body: Any, settings: ServerSettings, max_tokens: int | None, served: Any,
               token_field: str = "max_tokens", prompt_field: str = "prompt") -> GenerationJob:
    n = body.n or 1
    if body.stream and n > 1:
        raise ClientError(422, "stream with n > 1 is not supported", "n")
    if max_tokens is not None:
        _check_new_tokens(max_tokens, settings, token_field)
    new_tokens = fit_context(len(prompt_ids), max_tokens, settings.default_max_new_tokens, served.context, token_field, prompt_field)
    key = sampling_key(body.temperature, body.top_p, None, None, None, n, settings, "n", served.sampling_defaults, openai=True)
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return GenerationJob(prompt_ids, new_tokens, key, stop=stop, seed=body.seed, adapter=served.adapter)


def chat_prompt_ids(messages: list[Any], served: Any, settings: ServerSettings) -> list[int]:
    """Every message (whatever its role) cleaned and length-capped, then templated and tokenised. A template
    that refuses the conversation (e.g. roles that must alternate) is the client's error, not the server's."""
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ClientError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    cleaned, total = [], 0
    for index, message in enumerate(messages):
        field = f"messages.{index}.content"
        content = _CONTROL.sub("", message.content)
        if len(content) > settings.max_prompt_chars:
            raise ClientError(422, f"message has {len(content)} characters; the limit is {settings.max_prompt_chars}", field)
        total += len(content)
        if total > settings.max_prompt_chars:
            raise ClientError(422, f"the messages have over {settings.max_prompt_chars} characters together (the limit)", field)
        entry = {"role": message.role, "content": content}
        if message.name:
            entry["name"] = _CONTROL.sub("", message.name)[:64]
        cleaned.append(entry)
    if not any(entry["content"].strip() for entry in cleaned):
        raise ClientError(422, "every message is empty (after removing control characters and whitespace)", "messages")
    try:
        text = tokenizer.apply_chat_template(cleaned, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and whatever a template raises on odd input
        raise ClientError(422, f"the model's chat template refused these messages: {str(exc)[:200]}", "messages") from None
    if not isinstance(text, str):
        raise ClientError(422, "the model's chat template produced no text for these messages", "messages")
    return encode_prompt(tokenizer, text, settings, "messages", special=False)
