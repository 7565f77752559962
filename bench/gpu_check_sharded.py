"""Sharded training check for bench/gpu_check.sh: `nlm train` under `accelerate launch` with the shipped
configs/accelerate files (FSDP2; DeepSpeed ZeRO-2 and ZeRO-3 when `deepspeed` is installed), fused loss vs the
simple loss on the same data: step-1 loss and gradient norm must agree, and the fused loss must stay on.
One JSON line. `--smoke` runs the same code on the CPU with plain processes (accelerate enables FSDP and
DeepSpeed on accelerators only): it checks the script, not the engines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"fsdp2": "fsdp2.yaml", "deepspeed_zero2": "deepspeed_zero2.yaml", "deepspeed_zero3": "deepspeed_zero3.yaml"}


def _models(root: Path, smoke: bool) -> None:
    from nlm.models.scratch import build_causal_lm, build_tokenizer

    words = [f"w{i}" for i in range(400)]
    corpus = [" ".join(words[(i * 7 + j) % 400] for j in range(50)) for i in range(100)]
    tokenizer = build_tokenizer(corpus, vocab_size=300 if smoke else 4000)
    for name, hidden, layers in (("teacher", 64 if smoke else 512, 2 if smoke else 4), ("student", 32 if smoke else 256, 1 if smoke else 2)):
        model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers, num_heads=4, seed=0)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with (root / "train.jsonl").open("w") as handle:
        for line in corpus:
            handle.write(json.dumps({"prompt": line[:60], "completion": line[60:200]}) + "\n")


def _train(root: Path, engine: str | None, loss_impl: str, smoke: bool) -> dict:
    out = root / f"out-{engine or 'plain'}-{loss_impl}"
    launcher = [sys.executable, "-m", "nlm.cli"]
    if engine is not None and not smoke:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "configs" / "accelerate" / CONFIGS[engine]), "--num_processes", "1", "-m", "nlm.cli"]
    command = [*launcher, "train", "--teacher_model", str(root / "teacher"), "--student_model", str(root / "student"),
               "--train_file", str(root / "train.jsonl"), "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1",
               "--per_device_train_batch_size", "4", "--save_strategy", "no", "--precision", "fp32",
               "--loss_impl", loss_impl, "--device_preference", "cpu" if smoke else "cuda", "--max_seq_length", "128"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "NVIDIA_TF32_OVERRIDE": "0"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][-400:]}
    metadata = json.loads((out / "distill" / "final" / "training_metadata.json").read_text())
    first = next(entry for entry in metadata["log_history"] if entry.get("step") == 1 and "loss" in entry)
    return {"loss_impl": metadata["loss_impl"], "loss": first["loss"], "grad_norm": first.get("grad_norm")}


def sharded_part(smoke: bool = False) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nlm-sharded-"))
    _models(root, smoke)
    engines: list[str | None] = [None, "fsdp2"] + (["deepspeed_zero2", "deepspeed_zero3"] if smoke or importlib.util.find_spec("deepspeed") else [])
    results: dict = {}
    for engine in engines:
        fused, simple = _train(root, engine, "fused", smoke), _train(root, engine, "simple", smoke)
        entry = {"fused": fused, "simple": simple}
        if "error" not in fused and "error" not in simple:
            entry["fused_stayed_on"] = fused["loss_impl"] == "fused"
            entry["same_step1_loss"] = abs(fused["loss"] - simple["loss"]) <= 1e-3 * max(1.0, abs(simple["loss"]))
            entry["same_step1_grad_norm"] = abs(fused["grad_norm"] - simple["grad_norm"]) <= 1e-3 * max(1.0, simple["grad_norm"])
        results[engine or "single_process"] = entry
    if not smoke and not importlib.util.find_spec("deepspeed"):
        results["deepspeed"] = "skipped: deepspeed is not installed (pip install deepspeed)"
    return {"part": "sharded", "smoke": smoke, "results": results}


if __name__ == "__main__":
    print(json.dumps(sharded_part(smoke="--smoke" in sys.argv)), flush=True)
