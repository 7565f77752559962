"""Sharded training check for bench/gpu_check.sh: `nlm train` under `accelerate launch` with the shipped
configs/accelerate files (FSDP2; DeepSpeed ZeRO-2 and ZeRO-3 when `deepspeed` is installed), fused loss vs the
simple loss on the same data: step-1 loss and gradient norm must agree, and the fused loss must stay on.
One JSON line (also written to `--out FILE` after each engine, so a cut-off run keeps what it measured).

`--smoke` (CPU, tiny models) checks two things for real: `nlm train` fused vs simple in one process, and
FSDP2 itself — PyTorch's `fully_shard` over two gloo CPU processes around nlm's fused-loss pieces
(bench/fsdp_step.py: the head really is sharded, loss and gradient norm match one process with full logits).
It does NOT run `nlm train` under `accelerate launch` with FSDP (accelerate enables FSDP and DeepSpeed on
accelerators only), and DeepSpeed not at all: those run on a GPU only.
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
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][-400:]}
    metadata = json.loads((out / "distill" / "final" / "training_metadata.json").read_text())
    first = next(entry for entry in metadata["log_history"] if entry.get("step") == 1 and "loss" in entry)
    return {"loss_impl": metadata["loss_impl"], "loss": first["loss"], "grad_norm": first.get("grad_norm")}


def _fsdp2_on_cpu(root: Path) -> dict:
    """FSDP2 for real on two gloo CPU processes (bench/fsdp_step.py), where this torch has it."""
    import shutil

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return {"skipped": "this torch has no gloo backend"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = root / "fsdp2-cpu"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(REPO / "bench" / "fsdp_step.py"),
                           str(root / "student"), str(root / "teacher"), "root", "yes", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    if done.returncode != 0 or len(ranks) != 2 or "error" in ranks[0]:
        return {"error": ranks[0].get("error") if ranks else (done.stderr.strip().splitlines() or ["?"])[-1][-400:]}
    first = ranks[0]
    return {"what": "fully_shard over 2 gloo CPU processes around nlm's fused loss, vs 1 process with full logits",
            "head_is_sharded": first["head_is_sharded"], "fused_stayed_on": True,
            "same_step1_loss": abs(first["loss"] - first["reference_loss"]) <= 1e-5 * max(1.0, abs(first["reference_loss"])),
            "same_step1_grad_norm": abs(first["grad_norm"] - first["reference_grad_norm"]) <= 1e-5 * max(1.0, first["reference_grad_norm"]),
            "ranks_agree": ranks[0]["loss"] == ranks[1]["loss"]}


def _write(out: Path | None, result: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(result) + "\n")
        os.replace(partial, out)


def sharded_part(smoke: bool = False, out: Path | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nlm-sharded-"))
    _models(root, smoke)
    engines: list[str | None] = [None] if smoke else [None, "fsdp2"] + (["deepspeed_zero2", "deepspeed_zero3"] if importlib.util.find_spec("deepspeed") else [])
    results: dict = {}
    report = {"part": "sharded", "smoke": smoke, "complete": False, "results": results}
    if smoke:
        results["fsdp2_cpu_gloo"] = _fsdp2_on_cpu(root)
        results["accelerate_fsdp2_and_deepspeed"] = "not run: accelerate enables them on accelerators only"
        _write(out, report)
    for engine in engines:
        fused, simple = _train(root, engine, "fused", smoke), _train(root, engine, "simple", smoke)
        entry = {"fused": fused, "simple": simple}
        if "error" not in fused and "error" not in simple:
            entry["fused_stayed_on"] = fused["loss_impl"] == "fused"
            entry["same_step1_loss"] = abs(fused["loss"] - simple["loss"]) <= 1e-3 * max(1.0, abs(simple["loss"]))
            entry["same_step1_grad_norm"] = abs(fused["grad_norm"] - simple["grad_norm"]) <= 1e-3 * max(1.0, simple["grad_norm"])
        results[engine or "single_process"] = entry
        _write(out, report)
    if not smoke and not importlib.util.find_spec("deepspeed"):
        results["deepspeed"] = "skipped: deepspeed is not installed (pip install deepspeed)"
    report["complete"] = True
    _write(out, report)
    return report


if __name__ == "__main__":
    out_file = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
    print(json.dumps(sharded_part(smoke="--smoke" in sys.argv, out=out_file)), flush=True)
