"""Trainer callbacks: every logged figure goes through Python logging (plain or JSON lines) with progress."""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

logger = logging.getLogger("nlm.training")


class LoggingCallback(TrainerCallback):
    """Logs each `logging_steps` record with step, total steps and ETA; JSON mode carries them as fields."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        logger.info("training for %d steps", state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        step, total = state.global_step, state.max_steps or 0
        elapsed = time.perf_counter() - self._start
        eta = elapsed / step * (total - step) if step and total else None
        figures = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()}
        shown = " ".join(f"{k}={v}" for k, v in figures.items())
        eta_text = f" eta {eta:.0f}s" if eta is not None else ""
        logger.info("step %d/%d%s %s", step, total, eta_text, shown, extra={"step": step, "max_steps": total, **figures})


class BarOnlyProgressCallback(ProgressCallback):
    """The library's progress bar without its printing of log dicts (LoggingCallback logs them)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        return None


def install_callbacks(trainer: Any) -> None:
    """Replace the library's printers with ours: one logged line per logging step, a bar on terminals."""
    trainer.remove_callback(PrinterCallback)
    had_bar = any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    if had_bar:
        trainer.add_callback(BarOnlyProgressCallback())
    trainer.add_callback(LoggingCallback())


class HardwareMetricsCallback(TrainerCallback):
    """Adds process RSS/CPU and GPU (CUDA: memory, utilisation, temperature, power; MPS: memory) figures to
    each training log record, so the console, JSON logs, every tracker and log_history carry them.
    Runs first among the callbacks (see `add_hardware_metrics`) so the trackers see the added keys."""

    def __init__(self) -> None:
        self._sampler: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from nlm.training.hardware import HardwareSampler, device_type_of

        self._sampler = HardwareSampler(device_type_of(args))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs or self._sampler is None or "loss" not in logs:
            return
        figures = self._sampler.sample()
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)  # the Trainer copied `logs` there before calling us


def add_hardware_metrics(trainer: Any) -> None:
    """Put HardwareMetricsCallback before every other callback (trackers and printers read what it adds)."""
    trainer.callback_handler.callbacks.insert(0, HardwareMetricsCallback())
