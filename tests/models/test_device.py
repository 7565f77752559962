import logging

import pytest
import torch

from nlm.errors import DeviceError
from nlm.models.device import resolve_precision, select_device, teacher_dtype


def test_falls_back_to_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.INFO):
        device = select_device(["cuda", "mps", "cpu"])
    assert device.type == "cpu"  # this machine has no accelerator
    assert any(r.levelno == logging.WARNING and "running on the CPU" in r.getMessage() for r in caplog.records)
    assert "device cuda not available" in caplog.text


def test_preference_order_is_respected(monkeypatch):
    import nlm.models.device as device_module

    monkeypatch.setattr(device_module, "device_available", lambda name: name in ("mps", "cpu"))
    assert select_device(["cuda", "mps", "cpu"]).type == "mps"
    assert select_device(["cpu", "mps"]).type == "cpu"


def test_forced_device_must_exist():
    assert select_device(forced="cpu").type == "cpu"
    with pytest.raises(DeviceError, match="device 'cuda' was requested .* not available"):
        select_device(forced="cuda")


def test_no_available_preference_is_an_error():
    with pytest.raises(DeviceError, match="add 'cpu'"):
        select_device(["cuda"])


def test_precision_auto_and_explicit():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    plan = resolve_precision("bf16", cpu)
    assert plan.bf16 and plan.dtype == torch.bfloat16
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    assert teacher_dtype("auto", resolve_precision("auto", cpu), cpu) == torch.float32
    assert teacher_dtype("bf16", resolve_precision("auto", cpu), cpu) == torch.bfloat16


def test_precision_auto_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")).name == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    plan = resolve_precision("auto", torch.device("cuda"))
    assert plan.name == "fp16" and plan.fp16
