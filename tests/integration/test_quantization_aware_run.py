"""Quantization-aware distillation end to end: nlm train -> final/ -> nlm export int4 -> nlm serve.

The run's last evaluation (fake-quantized student) equals the exported int4 model's held-out loss; the
export serves over HTTP on loopback and answers a fixed prompt as `nlm generate` does.
"""

import json
import os
import subprocess
import sys

import httpx
import pytest

from nlm.apps.export import export_model
from nlm.apps.train import train
from nlm.config.sources import load_config
from tests.conftest import CORPUS, write_jsonl
from tests.integration.serving import wait_until_ready
from tests.integration.test_serve_process import free_port

pytestmark = pytest.mark.slow


def test_a_quantization_aware_run_exports_the_model_it_trained_and_the_export_serves(model_dirs, pc_file, tmp_path):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": t[:20], "completion": t[20:]} for t in CORPUS[:8]])
    config = load_config([
        "--teacher_model", str(model_dirs["student"]), "--student_model", str(model_dirs["student"]),  # self-distillation
        "--train_file", str(pc_file), "--eval_file", str(heldout), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "4", "--logging_steps", "2",
        "--save_steps", "100", "--eval_strategy", "steps", "--eval_steps", "4",
        "--quantization_aware.scheme", "int4", "--quantization_aware.group_size", "32",
    ]).config
    result = train(config)
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    assert metadata["config"]["quantization_aware"] == {"scheme": "int4", "group_size": 32, "keep_head_fp": False}
    weights = json.loads((result.final_dir / "model.safetensors.index.json").read_text())["weight_map"] \
        if (result.final_dir / "model.safetensors.index.json").exists() else None
    assert weights is None or not any("fake_quantizer" in k for k in weights)

    exported = export_model(result.run_dir, tmp_path / "int4", "int4", eval_file=heldout)
    quality = exported.metadata["quality"]
    assert exported.metadata["quantization"]["quantization_aware"] is True
    assert exported.metadata["quantization"]["group_size"] == 32
    # the run's last eval saw the fake-quantized student; the export is that model, quantized for real
    assert quality["export"]["loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-3)

    prompt = "the quick brown"
    generated = subprocess.run([sys.executable, "-m", "nlm.cli", "generate", "--model", str(exported.output_dir),
                                "--prompt", prompt, "--max_new_tokens", "8"], capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "nlm.cli", "serve", "--model", str(exported.output_dir),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(server, base)
        answer = httpx.post(f"{base}/invocations", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["responses"] == [generated.stdout.rstrip("\n")]
    finally:
        server.terminate()
        server.wait(timeout=30)
