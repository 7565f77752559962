"""Score a model on a JSONL file: loss, perplexity, token accuracy, and agreement with a teacher."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a trained model folder (full or LoRA adapter) or hub id")
    data: str = Field(description="JSONL file to score", json_schema_extra={"file": True})
    teacher: str | None = Field(None, description="also report KL to and top-1 agreement with this teacher")
    teacher_url: str | None = Field(None, description="the teacher behind an OpenAI-compatible server (e.g. "
                                   "http://127.0.0.1:8080/v1, `nlm serve`): KL over its top-K + tail buckets and top-1 "
                                   "agreement; API key from NLM_TEACHER_API_KEY")
    teacher_top_k: int = Field(20, ge=1, le=1024, description="with --teacher_url: top log-probs asked per token")
    teacher_served_model: str | None = Field(None, description="with --teacher_url: the served model (default: its only one)")
    baseline: str | None = Field(None, description="with --teacher: also report the share of the teacher-baseline gap "
                                                   "(loss, token accuracy) this model closes; the baseline is e.g. the "
                                                   "same student fine-tuned without a teacher")
    batch_size: int = Field(8, ge=1, description="sequences per forward")
    max_seq_length: int = Field(512, ge=1, description="longer sequences are truncated")
    device: Literal["cuda", "mps", "cpu"] | None = Field(None, description="force one device")
    exact_match: bool = Field(False, description="also generate greedily for each prompt/completion record and "
                                                  "count exact matches")
    as_json: bool = Field(False, alias="json", description="print one JSON object")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repository")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) weights")
    draft_for: str | None = Field(None, description="measure MODEL as this target's draft model (speculative "
                                                    "decoding): acceptance, speed-up, identical greedy outputs")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per prompt (--draft_for)")
    num_assistant_tokens: int = Field(5, ge=1, description="tokens the draft proposes per target forward (--draft_for)")


def run(options: Options) -> int:
    import json
    from pathlib import Path

    from nlm.apps.evaluate import evaluate_model
    from nlm.data.tokenize import TokenizeSettings
    from nlm.models.model_info import prompt_separator

    if options.draft_for is not None:
        from nlm.apps.draft_eval import report_draft

        return report_draft(options)
    served = None
    if options.teacher_url is not None:
        import os

        from nlm.distill.served_teacher import ServedSettings
        from nlm.errors import ConfigError

        if options.teacher is not None or options.baseline is not None:
            raise ConfigError("--teacher_url names the teacher: drop --teacher (and --baseline, which needs a local teacher)")
        served = ServedSettings(options.teacher_url, options.teacher_served_model, os.environ.get("NLM_TEACHER_API_KEY"),
                                options.teacher_top_k)
    result = evaluate_model(
        options.model, Path(options.data), teacher_path=options.teacher, batch_size=options.batch_size, served=served,
        settings=TokenizeSettings(max_seq_length=options.max_seq_length, prompt_separator=prompt_separator(options.model)),
        device=options.device, trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle,
        exact_match=options.exact_match,
    )
    if options.baseline is not None:
        from nlm.training.gap import gap_against

        result.update(gap_against(result, options.teacher, options.baseline, lambda path: evaluate_model(
            path, Path(options.data), batch_size=options.batch_size, device=options.device,
            settings=TokenizeSettings(max_seq_length=options.max_seq_length, prompt_separator=prompt_separator(path)),
            trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle)))
    if options.as_json:
        print(json.dumps(result))
        return 0
    # The usual figures first, then whatever else the evaluation reported (e.g. the per-byte figures against a
    # teacher with another tokenizer), so no figure is computed and then left unprinted.
    first = [key for key in ("loss", "perplexity", "token_accuracy", "exact_match", "teacher_kl", "teacher_agreement")
             if key in result]
    last = [key for key in ("tokens", "examples") if key in result]
    for key in first + [key for key in result if key not in first + last] + last:
        value = result[key]
        print(f"{key:<22} {value:.4f}" if isinstance(value, float) else f"{key:<22} {value}")
    return 0
