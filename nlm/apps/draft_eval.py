"""`nlm eval --draft_for TARGET`: how well a model serves as TARGET's draft in speculative decoding.

Every prompt is decoded greedily three ways: TARGET alone, DRAFT alone, and TARGET with DRAFT as its assistant
(transformers' assisted generation, `nlm.models.speculative`). Reported: tokens per target forward, the draft's
per-token acceptance rate, tokens/s of each way and the wall-clock speed-up of the assisted one over TARGET
alone, and how many assisted outputs differ from TARGET's own (greedy: must be 0; any difference is an error).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from nlm.apps.teacher_generate import prompt_of
from nlm.data.reader import ReadStats, iter_numbered_records
from nlm.errors import DataError, NlmError
from nlm.models.device import select_device
from nlm.models.generation import eos_token_ids
from nlm.models.loading import load_tokenizer, load_trained_model
from nlm.models.speculative import DraftCounts, assisted_greedy, check_draft_tokenizer, configure_draft


class DraftMismatchError(NlmError):
    """Greedy speculative decoding gave another output than the target alone (it must not)."""


def draft_prompts(data_file: Path, tokenizer: Any, separator: str) -> list[tuple[int, list[int]]]:
    """(line, prompt ids) of every record: a prompt/completion record's prompt + separator, a text record's text,
    a chat record's messages before its last assistant turns, templated with a generation prompt."""
    prompts = []
    for _, line, record in iter_numbered_records([data_file], ReadStats(), prompts_only=True):
        kind, prompt = prompt_of(record)
        if kind == "chat":
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt + (separator if record["format"] == "prompt_completion" else ""),
                            add_special_tokens=True)["input_ids"]
        if ids:
            prompts.append((line, ids))
    if not prompts:
        raise DataError(f"data file {data_file}: no record gives a non-empty prompt")
    return prompts


def _timed(target: Any, draft: Any, ids: torch.Tensor, max_new_tokens: int, tokenizer: Any,
           eos: list[int]) -> tuple[list[int], DraftCounts, float]:
    start = time.perf_counter()
    tokens, counts = assisted_greedy(target, draft, ids, max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=eos)
    return tokens, counts, time.perf_counter() - start


@torch.no_grad()
def evaluate_draft(draft_path: str | Path, target_path: str | Path, data_file: Path, *, max_new_tokens: int = 32,
                   num_assistant_tokens: int = 5, separator: str = "\n", device: str | None = None,
                   trust_remote_code: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """The figures of DRAFT as TARGET's assistant over the prompts of `data_file` (see the module docstring)."""
    draft_tokenizer = load_tokenizer(str(draft_path), trust_remote_code=trust_remote_code)
    target_tokenizer = load_tokenizer(str(target_path), trust_remote_code=trust_remote_code)
    check_draft_tokenizer(draft_tokenizer, target_tokenizer, str(draft_path), str(target_path))
    prompts = draft_prompts(Path(data_file), target_tokenizer, separator)
    place = select_device(forced=device) if device else select_device()
    load = {"device": place, "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    target = load_trained_model(target_path, **load).eval()
    draft = load_trained_model(draft_path, **load).eval()
    configure_draft(draft, num_assistant_tokens)
    eos = sorted(eos_token_ids(target, target_tokenizer))
    first = torch.tensor([prompts[0][1]], device=place)
    for model, helper in ((target, None), (draft, None), (target, draft)):  # lazy initialisation, untimed
        assisted_greedy(model, helper, first, 2, pad_token_id=target_tokenizer.pad_token_id, eos_token_id=eos)
    seconds = {"target": 0.0, "draft": 0.0, "speculative": 0.0}
    tokens = {"target": 0, "draft": 0}
    counts = DraftCounts()
    differing: list[int] = []
    for line, prompt in prompts:
        ids = torch.tensor([prompt], device=place)
        alone, _, took = _timed(target, None, ids, max_new_tokens, target_tokenizer, eos)
        seconds["target"] += took
        tokens["target"] += len(alone)
        drafted, _, took = _timed(draft, None, ids, max_new_tokens, target_tokenizer, eos)
        seconds["draft"] += took
        tokens["draft"] += len(drafted)
        assisted, step_counts, took = _timed(target, draft, ids, max_new_tokens, target_tokenizer, eos)
        seconds["speculative"] += took
        counts.add(step_counts)
        if assisted != alone:
            differing.append(line)
    result = {
        "model": str(draft_path), "draft_for": str(target_path), "data": str(data_file), "prompts": len(prompts),
        "max_new_tokens": max_new_tokens, "num_assistant_tokens": num_assistant_tokens,
        "tokens_per_target_forward": counts.tokens_per_target_forward,
        "accepted_per_target_forward": counts.accepted_per_target_forward,
        "acceptance_rate": counts.acceptance_rate,
        "target_tokens_per_s": tokens["target"] / seconds["target"],
        "draft_tokens_per_s": tokens["draft"] / seconds["draft"],
        "speculative_tokens_per_s": counts.new_tokens / seconds["speculative"],
        "speedup": seconds["target"] / seconds["speculative"],
        "drafted_tokens": counts.drafted, "accepted_tokens": counts.accepted, "target_forwards": counts.target_forwards,
        "new_tokens": counts.new_tokens, "differing_outputs": len(differing),
    }
    if differing:
        raise DraftMismatchError(
            f"{len(differing)} of {len(prompts)} greedy outputs with draft {draft_path} differ from target "
            f"{target_path} alone (first at {data_file} line {differing[0]}); greedy speculative decoding must "
            "reproduce the target exactly")
    return result



def report_draft(options: Any) -> int:
    """`nlm eval --draft_for`: check the flags that do not combine, evaluate, print (one JSON object or a table)."""
    import json

    from nlm.errors import ConfigError
    from nlm.models.model_info import prompt_separator

    if options.teacher is not None or options.exact_match:
        raise ConfigError("--draft_for measures MODEL as the draft of that target; it does not combine with "
                          "--teacher or --exact_match (run those as a separate `nlm eval`)")
    result = evaluate_draft(options.model, options.draft_for, Path(options.data), max_new_tokens=options.max_new_tokens,
                            num_assistant_tokens=options.num_assistant_tokens,
                            separator=prompt_separator(options.draft_for), device=options.device,
                            trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle)
    if options.as_json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    return 0
