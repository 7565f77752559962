"""The fused loss under FSDP2 on two CPU processes (gloo): same step-1 loss and gradient norm as one process
with full logits. See bench/fsdp_step.py for why the script wraps the model itself rather than going through
accelerate (which enables FSDP on accelerators only)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_step(model_dirs, tmp_path, head_unit: str, gather: str) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    script = Path(__file__).resolve().parents[2] / "bench" / "fsdp_step.py"  # also run by gpu_check_sharded --smoke
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(model_dirs["student"]),
                             str(model_dirs["teacher"]), head_unit, gather, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    files = sorted(tmp_path.glob("rank*.json"))
    assert len(files) == 2, result.stderr[-3000:]
    return [json.loads(path.read_text()) for path in files]


@pytest.mark.parametrize("head_unit", ["root", "own"])
def test_fused_loss_under_fsdp2_matches_one_process(model_dirs, tmp_path, head_unit):
    rank0, rank1 = run_step(model_dirs, tmp_path, head_unit, gather="yes")
    assert rank0["head_is_sharded"]  # the head really is sharded between steps
    assert rank0["loss"] == pytest.approx(rank0["reference_loss"], rel=1e-5)
    assert rank0["grad_norm"] == pytest.approx(rank0["reference_grad_norm"], rel=1e-5)
    assert rank1["loss"] == rank0["loss"] and rank1["grad_norm"] == rank0["grad_norm"]


def test_a_head_in_its_own_unit_needs_the_gather(model_dirs, tmp_path):
    rank0, _ = run_step(model_dirs, tmp_path, "own", gather="no")
    assert "DTensor" in rank0["error"]  # without gathered_head the chunk loop meets a shard
