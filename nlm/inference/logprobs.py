"""Log-probabilities on the OpenAI routes: what a request asks (checked against `--max_logprobs`), and the
response shapes clients already parse.

- /v1/completions, `logprobs: K` (and `echo`): OpenAI's legacy object per choice — `tokens`,
  `token_logprobs`, `top_logprobs` (token → log-prob, most likely first), `text_offset`; with `echo` the
  prompt's tokens come first (the first one has no log-prob: nothing predicts it).
- /v1/completions, `prompt_logprobs: K`: vLLM's extension, in vLLM's shape — per prompt token a dict keyed
  by token id (`"123"`) of `{logprob, rank, decoded_token}`, the top K plus the prompt token itself, `None`
  for the first token; and `return_tokens_as_token_ids` writes tokens as `"token_id:123"`.
- /v1/chat/completions, `logprobs: true, top_logprobs: K`: OpenAI's `{"content": [{token, logprob, bytes,
  top_logprobs}]}`.
- nlm's extension `nlm_format: "arrays"` (with `prompt_logprobs: K`, `max_tokens: 0`): per choice,
  `nlm_prompt_logprobs` = `{top_k, token_ids, logprobs, token_logprobs, ranks}`, flat arrays over the prompt's
  positions 1 .. L-1 (`token_ids`/`logprobs` row-major [L-1, K], most likely first; `token_logprobs`/`ranks`
  those of the prompt's own tokens) instead of one object per position: a served teacher's answers, ~3×
  smaller and parsed without one Python dict per entry.

The numbers are the engine's (`LogprobSpec`): the model's own distribution at temperature 1 over its real
vocabulary, whatever the sampling settings (nlm's `logprobs_temperature` extension changes only that
temperature). `GET /v1/models` adds the tokenizer fingerprint (`model_card`), so a client can check it
scores with its own tokenizer before trusting token ids.
"""

from __future__ import annotations

from typing import Any

from nlm.inference.engine import GenerationOutput, LogprobSpec, PositionLogprobs, PromptScores
from nlm.inference.jobs import ClientError
from nlm.inference.settings import ServerSettings
from nlm.models.vocab import vocabulary_fingerprint

_FINGERPRINTS: dict[int, str] = {}  # by id(tokenizer): hashing a 150k vocabulary once per model, not per request
_TEXTS: dict[int, dict[int, str]] = {}  # by id(tokenizer): token id -> its decoded text, decoded once per server


def json_body(answer: dict[str, Any]) -> Any:
    """A response for a log-prob answer (K entries per token make large bodies): serialised by orjson when it
    is installed (several times faster than json on these), never walked by FastAPI's jsonable_encoder."""
    try:
        import orjson
    except ImportError:
        from fastapi.responses import JSONResponse

        return JSONResponse(answer)
    from fastapi.responses import Response

    return Response(orjson.dumps(answer), media_type="application/json")


def _check_cap(value: int | None, field: str, settings: ServerSettings) -> None:
    if value is not None and value > settings.max_logprobs:
        raise ClientError(422, f"{field} = {value} is over this server's cap of {settings.max_logprobs} "
                               "(nlm serve --max_logprobs)", field)


def completion_spec(body: Any, settings: ServerSettings) -> LogprobSpec | None:
    """What a /v1/completions request asks for; None when it asks for no log-probs."""
    _check_cap(body.logprobs, "logprobs", settings)
    _check_cap(body.prompt_logprobs, "prompt_logprobs", settings)
    if body.max_tokens == 0 and not body.echo and body.prompt_logprobs is None:
        raise ClientError(422, "max_tokens = 0 generates nothing: ask for echo or prompt_logprobs to score the prompt",
                          "max_tokens")
    prompt = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt = max(prompt or 0, body.logprobs)
    if body.logprobs is None and prompt is None:
        return None
    return LogprobSpec(generated=body.logprobs, prompt=prompt, temperature=body.logprobs_temperature or 1.0)


def chat_spec(body: Any, settings: ServerSettings) -> LogprobSpec | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise ClientError(422, "top_logprobs needs logprobs: true", "top_logprobs")
    _check_cap(body.top_logprobs, "top_logprobs", settings)
    return LogprobSpec(generated=body.top_logprobs or 0) if body.logprobs else None


def prompt_token_ids(prompt: list[int], tokenizer: Any, settings: ServerSettings) -> list[int]:
    """A prompt given as token ids, checked against the vocabulary and the prompt cap."""
    if not prompt:
        raise ClientError(422, "prompt is an empty list of token ids", "prompt")
    if len(prompt) > settings.max_prompt_tokens:
        raise ClientError(422, f"prompt has {len(prompt)} tokens; the limit is {settings.max_prompt_tokens}", "prompt")
    width = len(tokenizer)
    bad = next((token for token in prompt if not 0 <= token < width), None)
    if bad is not None:
        raise ClientError(422, f"prompt token id {bad} is outside this model's vocabulary of {width} tokens", "prompt")
    return list(prompt)


def model_card(tokenizer: Any, settings: ServerSettings) -> dict[str, Any]:
    """What /v1/models adds to a model's entry: token identity, the log-prob cap, and what the engine serves
    beyond vLLM's shape, declared so a client need not infer it: `logprobs_temperature` and `nlm_format` (the
    answer formats it takes: `["arrays"]`, one-pass scoring of `max_tokens: 0`) on --engine nlm only."""
    key = id(tokenizer)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = vocabulary_fingerprint(tokenizer)
    return {"tokenizer_fingerprint": _FINGERPRINTS[key], "vocab_size": len(tokenizer), "max_logprobs": settings.max_logprobs,
            "logprobs_temperature": settings.engine == "nlm",
            "nlm_format": ["arrays"] if settings.engine == "nlm" else [],
            "max_batch_size": settings.max_batch_size}  # the most token-id prompts one request may hold


class _Names:
    """Token strings as a response shows them: decoded text, or "token_id:N" when the client asks."""

    def __init__(self, tokenizer: Any, as_ids: bool) -> None:
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self._text = _TEXTS.setdefault(id(tokenizer), {})

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token])
        return self._text[token]

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.text(token)


def _legacy(positions: list[PositionLogprobs | None], tokens: list[int], names: _Names, start: int) -> dict[str, list]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for token, position in zip(tokens, positions, strict=True):
        out["tokens"].append(names(token))
        out["text_offset"].append(offset)
        offset += len(names.text(token))
        out["token_logprobs"].append(None if position is None else position.logprob)
        out["top_logprobs"].append(None if position is None else {names(t): v for t, v in position.top})
    return out


def _vllm_prompt(positions: list[PositionLogprobs | None], names: _Names, top: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per token, the top `top` and the token itself, keyed by token id."""
    out: list[dict | None] = []
    for position in positions:
        if position is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": v, "rank": rank, "decoded_token": names(t)}
                 for rank, (t, v) in enumerate(position.top[:top], start=1)}
        entry.setdefault(str(position.token), {"logprob": position.logprob, "rank": position.rank,
                                               "decoded_token": names(position.token)})
        out.append(entry)
    return out


def completion_choices(body: Any, output: GenerationOutput, prompt_ids: list[int], prompt_text: str,
                       tokenizer: Any) -> list[dict[str, Any]]:
    """The `choices` of a /v1/completions response, with `logprobs` (and vLLM's `prompt_logprobs`) filled in."""
    names = _Names(tokenizer, bool(body.return_tokens_as_token_ids))
    prompt_positions = output.prompt_logprobs
    choices = []
    for index, (text, reason) in enumerate(zip(output.texts, output.finish_reasons, strict=True)):
        choice: dict[str, Any] = {"index": index, "text": (prompt_text + text) if body.echo else text,
                                  "finish_reason": reason, "logprobs": None}
        if body.logprobs is not None:
            generated = output.token_ids[index]
            positions: list[PositionLogprobs | None] = list(output.logprobs[index]) if output.logprobs else []
            tokens = generated
            if body.echo and prompt_positions is not None:
                positions = [_trim(p, body.logprobs) for p in prompt_positions] + positions
                tokens = prompt_ids + generated
            choice["logprobs"] = _legacy(positions, tokens, names, 0 if body.echo else len(prompt_text))
        if body.prompt_logprobs is not None and prompt_positions is not None:
            choice["prompt_logprobs"] = _vllm_prompt(prompt_positions, names, body.prompt_logprobs)
            choice["prompt_token_ids"] = prompt_ids
        choices.append(choice)
    return choices


def scored_choices(body: Any, scores: list[PromptScores], prompts: list[list[int]], texts: list[str] | None,
                   tokenizer: Any) -> list[dict[str, Any]]:
    """The `choices` of a scoring request (max_tokens 0): one per prompt, nothing generated. `texts` are the
    prompts as the client sent them (text prompts), else they are decoded when a field shows them."""
    choices = []
    for index, (score, prompt) in enumerate(zip(scores, prompts, strict=True)):
        if body.nlm_format == "arrays":
            choices.append({"index": index, "text": "", "finish_reason": "length", "logprobs": None,
                            "nlm_prompt_logprobs": prompt_arrays(score)})
            continue
        shown = body.echo or body.logprobs is not None
        text = texts[index] if texts is not None else tokenizer.decode(prompt) if shown else ""
        output = GenerationOutput([""], 0, ["length"], [[]], [[]] if body.logprobs is not None else None,
                                  score.positions(prompt))
        choices.extend({**choice, "index": index} for choice in completion_choices(body, output, prompt, text, tokenizer))
    return choices


def prompt_arrays(score: PromptScores) -> dict[str, Any]:
    """nlm's `nlm_prompt_logprobs`: flat arrays; the float32 values written as exact decimals."""
    return {"top_k": int(score.top_ids.shape[1]), "token_ids": score.top_ids.reshape(-1).tolist(),
            "logprobs": score.top_logprobs.reshape(-1).tolist(), "token_logprobs": score.token_logprobs.tolist(),
            "ranks": score.ranks.tolist()}


def _trim(position: PositionLogprobs | None, top: int) -> PositionLogprobs | None:
    return None if position is None else PositionLogprobs(position.token, position.logprob, position.top[:top], position.rank)


def chat_logprobs(output: GenerationOutput, index: int, tokenizer: Any, as_ids: bool) -> dict[str, Any] | None:
    """OpenAI's chat `logprobs` object of one choice (None when the request did not ask)."""
    if output.logprobs is None:
        return None
    names = _Names(tokenizer, as_ids)

    def item(token: int, value: float) -> dict[str, Any]:
        name = names(token)
        return {"token": name, "logprob": value, "bytes": list(names.text(token).encode("utf-8"))}

    return {"content": [{**item(p.token, p.logprob), "top_logprobs": [item(t, v) for t, v in p.top]}
                        for p in output.logprobs[index]]}
