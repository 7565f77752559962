"""The generation engines `nlm serve --engine` chooses between, registered by name.

Each kind loads what the HTTP front needs of every served model (tokenizer, context, sampling defaults) and
starts the engines that generate for them. An engine has `generate(job) -> GenerationOutput` and
`score(scoring_job) -> [PromptScores]` (async), `queue_depth`, `alive`, `stop()`, `refresh_metrics(metrics)` (async,
before each /metrics scrape): the routes and guarantees of nlm/inference/app.py are the same over all of them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nlm.inference.settings import VLLM_PYTHON_ENV, ServerSettings


@dataclass(frozen=True)
class EngineKind:
    load: Callable[[ServerSettings], list[Any]]  # settings -> [ServedModel], in order
    start: Callable[[list[Any], ServerSettings, Any], dict[str, Any]]  # served, settings, metrics -> {name: engine}


def _nlm_load(settings: ServerSettings) -> list[Any]:
    from nlm.inference.model_registry import load_served_models

    return load_served_models(settings)


def _nlm_start(served: list[Any], settings: ServerSettings, metrics: Any) -> dict[str, Any]:
    from nlm.inference.engine import GenerationEngine

    by_model: dict[int, GenerationEngine] = {}
    engines: dict[str, Any] = {}
    for entry in served:
        if id(entry.model) not in by_model:
            engine = GenerationEngine(entry.model, entry.tokenizer, max_batch_size=settings.max_batch_size,
                                      batch_window_ms=settings.batch_window_ms, observe_batch=metrics.batch_size.observe,
                                      multi_adapter=entry.adapter is not None, draft=entry.draft,
                                      num_assistant_tokens=settings.num_assistant_tokens,
                                      observe_draft=metrics.observe_draft)
            engine.warm_up()
            engine.start()
            by_model[id(entry.model)] = engine
        engines[entry.name] = by_model[id(entry.model)]
    return engines


def _vllm_load(settings: ServerSettings) -> list[Any]:
    from nlm.inference.vllm_engine import load_vllm_models

    return load_vllm_models(settings)


def _vllm_start(served: list[Any], settings: ServerSettings, metrics: Any) -> dict[str, Any]:
    from nlm.inference.vllm_engine import start_vllm_engines

    return start_vllm_engines(served, settings, metrics)


ENGINES: dict[str, EngineKind] = {"nlm": EngineKind(_nlm_load, _nlm_start), "vllm": EngineKind(_vllm_load, _vllm_start)}


def vllm_available() -> bool:
    """vLLM can run: importable here, or a Python that has it is named by NLM_VLLM_PYTHON."""
    return bool(os.environ.get(VLLM_PYTHON_ENV)) or importlib.util.find_spec("vllm") is not None


def default_engine() -> str:
    """The `--engine` rule: vllm when vLLM is available (see `vllm_available`), else nlm."""
    return "vllm" if vllm_available() else "nlm"


def engine_kind(name: str | None) -> EngineKind:
    return ENGINES[name or "nlm"]
