"""The GPU check is run only where a GPU is lent; its --smoke mode runs the same code on the CPU so it
cannot rot unnoticed between such sessions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.mark.parametrize("part", ["loss", "bf16", "train"])
def test_gpu_check_smoke(part):
    done = subprocess.run([sys.executable, str(SCRIPT), part, "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if part == "bf16":  # the fused chunks run under the autocast: far closer to the bf16 simple path than fp32
        assert result["grad_rel_diff"] < 2e-2 and result["loss_abs_diff"] < 1e-3
        assert result["loss_abs_diff"] < result["fp32_fused_loss_abs_diff"]
    elif part == "loss":
        assert "seconds" in result["results"]["fused"] and "seconds" in result["results"]["simple"]
    else:
        assert result["results"]["live"]["tokens_per_s"] > 0 and result["results"]["cached"]["tokens_per_s"] > 0


def test_sharded_check_smoke():
    script = SCRIPT.with_name("gpu_check_sharded.py")
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    for entry in results.values():
        assert entry["fused_stayed_on"] and entry["same_step1_loss"] and entry["same_step1_grad_norm"], entry
