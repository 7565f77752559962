"""The models one server answers for: loading them (LoRA students of one base share one copy of its weights)
and what each one's config says requests may ask for (context length, end-of-sequence ids, sampling defaults)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlm.inference.settings import ServerSettings

logger = logging.getLogger("nlm.serve")

SAMPLING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class ServedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any
    adapter: str | None = None  # the PEFT adapter inside `model` that is this student (shared base); None: the model itself
    separator: str = "\n"
    context: int | None = None
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    draft: Any = None  # the speculative-decoding draft model (`--draft`), on the model's device


def sampling_defaults(model: Any) -> dict[str, Any]:
    """The sampling settings a model's generation_config sets away from transformers' defaults (vLLM does the same)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    try:
        diff = config.to_diff_dict()
    except Exception:  # noqa: BLE001 - an odd generation_config must not stop serving; requests set their own values
        return {}
    return {name: diff[name] for name in SAMPLING_FIELDS if diff.get(name) is not None}


def _adapter_base(path: Path) -> str | None:
    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _tokenizer(path: Path, fallback: str | None, settings: ServerSettings) -> Any:
    from nlm.errors import ModelLoadError
    from nlm.models.loading import load_tokenizer

    try:
        return load_tokenizer(str(path), trust_remote_code=settings.trust_remote_code)
    except ModelLoadError:
        if fallback is None:
            raise
        return load_tokenizer(fallback, trust_remote_code=settings.trust_remote_code)


def load_served_models(settings: ServerSettings) -> list[ServedModel]:
    """Load every model of `settings.served_models`, in order. LoRA adapters naming the same base become adapters
    of one PEFT model (`adapter_name` = the served name), so N students cost one base plus N small adapters."""
    from nlm.inference.engine import context_length
    from nlm.models.device import select_device
    from nlm.models.loading import load_causal_lm, load_trained_model
    from nlm.models.model_info import prompt_separator

    device = select_device(forced=settings.device) if settings.device else select_device()
    specs = settings.served_models
    by_base: dict[str, list[tuple[str, Path]]] = {}
    for name, path in specs:
        base = _adapter_base(path)
        if base is not None:
            by_base.setdefault(base, []).append((name, path))
    shared: dict[str, tuple[Any, str]] = {}  # served name -> (PEFT model, base name)
    for base, members in by_base.items():
        if len(members) < 2:
            continue
        from peft import PeftModel

        model = load_causal_lm(base, trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle)
        (first_name, first_path), rest = members[0], members[1:]
        model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_name)
        for name, path in rest:
            model.load_adapter(str(path), adapter_name=name)
        model = model.to(device).eval()
        logger.info("LoRA students %s share one copy of %s", ", ".join(n for n, _ in members), base)
        for name, _ in members:
            shared[name] = (model, base)
    served = []
    for name, path in specs:
        if name in shared:
            model, base = shared[name]
            tokenizer, adapter = _tokenizer(path, base, settings), name
        else:
            model = load_trained_model(path, device=device, trust_remote_code=settings.trust_remote_code,
                                       allow_pickle=settings.allow_pickle)
            tokenizer, adapter = _tokenizer(path, _adapter_base(path), settings), None
        separator = settings.prompt_separator if settings.prompt_separator is not None else prompt_separator(path)
        served.append(ServedModel(name, path, model, tokenizer, adapter, separator, context_length(model.config),
                                  sampling_defaults(model)))
    if settings.draft is not None:
        served[0].draft = load_draft(settings, served[0], device)
    return served


def check_draft(settings: ServerSettings, target: ServedModel) -> None:
    """`--draft` serves one model (not LoRA students) and shares that model's tokenizer (either engine)."""
    from nlm.errors import ConfigError
    from nlm.models.loading import load_tokenizer
    from nlm.models.speculative import check_draft_tokenizer

    if len(settings.served_models) > 1 or target.adapter is not None:
        raise ConfigError("--draft serves one model with its draft; give a single --model (not LoRA students "
                          "sharing a base)")
    assert settings.draft is not None
    draft_tokenizer = load_tokenizer(str(settings.draft), trust_remote_code=settings.trust_remote_code)
    check_draft_tokenizer(draft_tokenizer, target.tokenizer, str(settings.draft), str(target.path))


def load_draft(settings: ServerSettings, target: ServedModel, device: Any) -> Any:
    """The `--draft` model for the one served model: it must share that model's tokenizer."""
    from nlm.models.loading import load_trained_model

    check_draft(settings, target)
    assert settings.draft is not None
    return load_trained_model(settings.draft, device=device, trust_remote_code=settings.trust_remote_code,
                              allow_pickle=settings.allow_pickle).eval()
