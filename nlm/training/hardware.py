"""Hardware figures for each logged step: process memory and CPU; CUDA memory, utilisation, temperature and
power; MPS memory. What is unavailable is found once and never sampled again (no cost without a GPU).

Sources are libraries: psutil (process RSS and CPU), torch.cuda's allocator counters, torch.cuda's NVML
wrappers (`utilization`, `temperature`, `power_draw`, which map CUDA_VISIBLE_DEVICES themselves and need
the optional nvidia-ml-py), torch.mps's allocator counters.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

MB = 2**20


def _process_samplers() -> dict[str, Callable[[], float]]:
    try:
        import psutil
    except ImportError:
        return {}
    process = psutil.Process()
    process.cpu_percent(None)  # the first call starts the interval
    return {"sys_rss_mb": lambda: process.memory_info().rss / MB, "sys_cpu_percent": lambda: process.cpu_percent(None)}


def _cuda_samplers(device: int) -> dict[str, Callable[[], float]]:
    samplers: dict[str, Callable[[], float]] = {
        "gpu_mem_allocated_mb": lambda: torch.cuda.memory_allocated(device) / MB,
        "gpu_mem_reserved_mb": lambda: torch.cuda.memory_reserved(device) / MB,
        "gpu_mem_peak_mb": lambda: torch.cuda.max_memory_allocated(device) / MB,
    }
    if importlib.util.find_spec("pynvml") is None:
        logger.info("GPU utilisation, temperature and power need nvidia-ml-py (pip install nvidia-ml-py)")
        return samplers
    nvml = {"gpu_util_percent": lambda: float(torch.cuda.utilization(device)),
            "gpu_temperature_c": lambda: float(torch.cuda.temperature(device)),
            "gpu_power_w": lambda: torch.cuda.power_draw(device) / 1000.0}
    for name, sample in nvml.items():
        try:
            sample()
            samplers[name] = sample
        except Exception as exc:  # a driver without the query: leave that figure out, once
            logger.info("%s unavailable: %s", name, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
    return samplers


def _mps_samplers() -> dict[str, Callable[[], float]]:
    return {"mps_allocated_mb": lambda: torch.mps.current_allocated_memory() / MB,
            "mps_driver_mb": lambda: torch.mps.driver_allocated_memory() / MB}


class HardwareSampler:
    """Reads the figures available on this machine; `sample()` returns them rounded, by name."""

    def __init__(self, device_type: str | None = None, cuda_device: int | None = None) -> None:
        self.samplers = _process_samplers()
        if device_type == "cuda" and torch.cuda.is_available():
            self.samplers.update(_cuda_samplers(torch.cuda.current_device() if cuda_device is None else cuda_device))
        elif device_type == "mps" and torch.backends.mps.is_available():
            self.samplers.update(_mps_samplers())

    def sample(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        for name, read in self.samplers.items():
            try:
                figures[name] = round(float(read()), 2)
            except Exception:  # a transient driver error must never stop training; the figure is skipped
                continue
        return figures


def device_type_of(args: Any) -> str:
    """The device the Trainer placed the model on ('cpu', 'cuda', 'mps')."""
    return getattr(getattr(args, "device", None), "type", "cpu")
