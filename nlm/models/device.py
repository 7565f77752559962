"""Which device and dtype a run uses: the first available of the user's preference, and a precision to match."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nlm.errors import DeviceError

logger = logging.getLogger(__name__)


def device_available(name: str) -> bool:
    kind = name.split(":", 1)[0]
    if kind == "cpu":
        return True
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        return index < torch.cuda.device_count()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return False


def select_device(preference: Sequence[str] = ("cuda", "mps", "cpu"), forced: str | None = None) -> torch.device:
    """The first available device in `preference`; `forced` must be available or it is an error."""
    if forced is not None:
        if not device_available(forced):
            raise DeviceError(f"device {forced!r} was requested (--device) but is not available on this machine")
        logger.info("device: %s (forced)", forced)
        return torch.device(forced)
    for index, name in enumerate(preference):
        if device_available(name):
            if name == "cpu" and index > 0:
                logger.warning("no %s available: running on the CPU, which is slow", " or ".join(preference[:index]))
            logger.info("device: %s", name)
            return torch.device(name)
        logger.info("device %s not available, trying the next preference", name)
    raise DeviceError(f"none of the preferred devices {list(preference)} is available; add 'cpu' to device_preference")


@dataclass(frozen=True)
class PrecisionPlan:
    """The weights' dtype and the Trainer's mixed-precision switches."""

    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype
    bf16: bool
    fp16: bool


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> PrecisionPlan:
    """auto: bf16 on CUDA that supports it, fp16 (with loss scaling) on older CUDA, fp32 on CPU and MPS.

    Mixed precision keeps master weights in fp32 and autocasts the forward; fp16 uses a loss scaler.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if _bf16_supported(device) else "fp16"
        else:
            precision = "fp32"
    if precision == "bf16" and device.type == "cuda" and not _bf16_supported(device):
        raise DeviceError(f"precision bf16 was requested but {device} does not support it; use fp16 or auto")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return PrecisionPlan(precision, dtypes[precision], bf16=precision == "bf16", fp16=precision == "fp16")


def teacher_dtype(teacher_precision: str, student_plan: PrecisionPlan, device: torch.device) -> torch.dtype:
    """The frozen teacher's weights dtype: under mixed precision it can be stored in half precision outright."""
    if teacher_precision == "auto":
        return student_plan.dtype if device.type != "cpu" else torch.float32
    return resolve_precision(teacher_precision, device).dtype
