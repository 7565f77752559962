"""Logging for the whole process: one handler, plain or JSON lines, with secrets redacted.

Secrets are registered once (from the environment and the parsed config) and replaced by `**********`
in every record that reaches the handler, including formatted exceptions and third-party loggers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

REDACTED = "**********"
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact `value` from every log record from now on. Values under 4 characters would redact noise."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and exception text with every registered secret replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
                record.exc_info = None
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` metrics."""

    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return redact(json.dumps(entry, default=str))


def setup_logging(level: str = "INFO", log_format: str = "text", secrets: Iterable[str] = ()) -> None:
    """Install nlm's handler on the root logger and route transformers/datasets logs through it."""
    for secret in secrets:
        register_secret(secret)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_nlm", False):
            root.removeHandler(old)
    handler._nlm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # Under torchrun/accelerate only the main process speaks; the others log warnings and errors only.
    root.setLevel(level if is_main_process() else max(logging.getLevelName(level), logging.WARNING))
    route_warnings()
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "httpcore", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # issue 15: transformers imports torchao (installed for `nlm export`) on every model load, and torchao logs
    # the optional GPU kernels it cannot load plus torch pytree notices: not actionable, so errors only.
    for import_noise in ("torchao", "torch.utils._pytree"):
        logging.getLogger(import_noise).setLevel(max(logging.ERROR, root.level))
    _state["log_format"] = log_format
    # transformers and datasets are configured when (and only if) a command imports them, so `nlm --help`,
    # `nlm config show` and usage errors start without loading them.
    when_imported("datasets", _configure_datasets)
    when_imported("transformers", _configure_transformers)


_state: dict[str, str] = {"log_format": "text"}
_NLM_DIR = str(Path(__file__).resolve().parents[1])
hidden_warnings: Counter[str] = Counter()


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, accelerate and SageMaker set RANK), or a single process.
    Read from the environment so that logging is set up before torch is imported."""
    return os.environ.get("RANK", "0") in ("", "0")


def route_warnings() -> None:
    """Python warnings go through logging: those raised from nlm's own code at WARNING (a call of ours to fix),
    those from libraries at DEBUG only (their internal deprecations are not the user's business), counted so
    the command can say once how many it hid."""
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    text = f"{category.__name__}: {message} ({filename}:{lineno})"
    if str(Path(filename).resolve()).startswith(_NLM_DIR):
        logging.getLogger("nlm.warnings").warning(text)
    else:
        hidden_warnings[category.__name__] += 1
        logging.getLogger("py.warnings").debug(text)


def current_log_format() -> str:
    """The `--log_format` the process was started with: 'text' or 'json'."""
    return _state["log_format"]


def _quiet_bars() -> bool:
    # Library progress bars (weight loading, dataset generation) are noise in logs and pipes.
    return _state["log_format"] == "json" or not sys.stderr.isatty()


def _configure_datasets(datasets: ModuleType) -> None:
    if _quiet_bars():
        datasets.disable_progress_bars()


def _configure_transformers(transformers: ModuleType) -> None:
    from transformers.utils import logging as hf_logging

    if _quiet_bars():
        hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(max(logging.WARNING, logging.getLogger().level))


_pending: dict[str, Callable[[ModuleType], None]] = {}


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call `hook(module)` now if `name` is imported, else right after its first import.

    Written by hand because the standard library has no post-import hook (PEP 369 was withdrawn); this is
    the usual meta-path finder that wraps the module's loader once.
    """
    if name in sys.modules:
        hook(sys.modules[name])
        return
    _pending[name] = hook
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _pending:
            return None
        hook = _pending.pop(fullname)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module: ModuleType) -> None:
            exec_module(module)
            hook(module)

        loader.exec_module = exec_then_hook  # type: ignore[method-assign]
        return spec
