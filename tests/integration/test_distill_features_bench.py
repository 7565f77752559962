"""bench/distill_features.py --smoke runs the whole feature comparison on a few hundred examples, so the script
behind the docs/BENCHMARKS.md table cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "distill_features.py"


@pytest.mark.slow
def test_distill_features_smoke():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert set(result["mean"]) == {"fine_tuned", "kd", "pruned_kd", "pruned_kd_hidden", "mixture", "entropy_tau"}
    for row in result["mean"].values():
        assert 0 <= row["accuracy"] <= 1 and row["heldout_loss"] > 0 and row["seconds"] > 0
