"""The GPU check is run only where a GPU is lent; `bench/gpu_check.sh --smoke` runs the same command, parts
and code on the CPU at tiny sizes so it cannot rot unnoticed between such sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_check_command_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    # One summary line per part, in the order of importance, then the total.
    parts = ["loss_memory", "train_throughput", "bf16_fused_vs_simple", "sharded"]
    assert [line.split(":")[0] for line in lines[:4]] == parts, done.stdout
    assert lines[-1].startswith("gpu_check: ")
    results = {name: json.loads((tmp_path / "gpu_check" / f"{name}.json").read_text())
               for name in ("loss", "train", "bf16", "sharded")}
    assert all(result.get("complete", True) for result in results.values())
    loss = results["loss"]["results"]
    assert "seconds" in loss["fused"] and "seconds" in loss["simple"]
    train = results["train"]["results"]
    assert train["live"]["tokens_per_s"] > 0 and train["cached"]["tokens_per_s"] > 0
    bf16 = results["bf16"]  # the fused chunks run under the autocast: far closer to the bf16 simple path than fp32
    assert bf16["grad_rel_diff"] < 2e-2 and bf16["loss_abs_diff"] < 1e-3
    assert bf16["loss_abs_diff"] < bf16["fp32_fused_loss_abs_diff"]
    sharded = results["sharded"]["results"]
    single, fsdp2 = sharded["single_process"], sharded["fsdp2_cpu_gloo"]
    assert single["fused_stayed_on"] and single["same_step1_loss"] and single["same_step1_grad_norm"], single
    # FSDP2 for real: the head is sharded between steps and the sharded step equals one process.
    assert fsdp2["head_is_sharded"] and fsdp2["same_step1_loss"] and fsdp2["same_step1_grad_norm"], fsdp2
    assert json.loads((tmp_path / "gpu_check.json").read_text().splitlines()[0])
