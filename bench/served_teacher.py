"""Training from a served teacher (`nlm serve` on loopback) vs the in-process teacher vs its cache, on the demo task.

Trains the demo's teacher, serves it with `nlm serve --max_logprobs 64` on a loopback port, then trains the same
student several ways, each in its own process (so its peak memory is its own): the live in-process teacher, a
top-64 cache, and the server at K = 5, 20, 64 (`teacher_url`, `teacher_top_k`). Reports held-out loss and
accuracy, training tokens/s, the student process's peak RSS, and for the served runs the time the trainer
waited on the server vs computed.

    .venv/bin/python bench/served_teacher.py [--seed 0]
    .venv/bin/python bench/served_teacher.py --vocab 32768 --tail_share 0.3   # realistic vocabulary, long tail

`--vocab`/`--tail_share` are bench/cache_quality.py's: the tokenizer grown to N tokens and a long-tailed teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(config_json: str) -> None:
    """One training run in this process; prints its figures as the last stdout line."""
    import gc

    from peak_memory import peak_rss_mib

    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig
    from nlm.distill.served_teacher import ServedTeacher

    result = train(TrainingConfig(**json.loads(config_json)))
    served = [o for o in gc.get_objects() if isinstance(o, ServedTeacher)]
    figures = {"final": str(result.final_dir), "train_runtime": result.metrics.get("train_runtime"),
               "samples_per_second": result.metrics.get("train_samples_per_second"),
               "peak_rss_mb": round(peak_rss_mib(), 1)}
    if served:
        figures["wait_seconds"] = round(served[0].wait_seconds, 2)
    print(json.dumps(figures))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(folder: Path, port: int) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "nlm.cli", "serve", "--model", str(folder), "--port", str(port),
                                "--max_logprobs", "64", "--max_batch_size", "16", "--device", "cpu"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("nlm serve did not become ready")


def run_child(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config, default=str)], capture_output=True,
                         text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top_k", type=int, nargs="+", default=[5, 20, 64])
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--tail_share", type=float, default=0.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    from cache_quality import long_tail

    from nlm.apps.evaluate import evaluate_model
    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig
    from nlm.data.tokenize import TokenizeSettings
    from nlm.demo.pipeline import DemoBudget, initial_model, write_demo_data

    budget = DemoBudget()
    with tempfile.TemporaryDirectory(prefix="nlm-served-teacher-") as scratch:
        root = Path(scratch)
        files = write_demo_data(root, args.seed)
        tail_stats = long_tail(root, files, args.vocab, args.tail_share, args.seed)
        teacher_init = initial_model(root, "teacher", budget.teacher_layers, budget.teacher_hidden, args.seed)
        student_init = initial_model(root, "student", budget.student_layers, budget.student_hidden, args.seed)
        common = dict(max_seq_length=64, seed=args.seed, save_strategy="no", logging_steps=50, device_preference=["cpu"],
                      per_device_train_batch_size=budget.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05)
        teacher = train(TrainingConfig(student_model=str(teacher_init), train_file=files["teacher_train"],
                                       output_dir=root / "runs", run_name="teacher", num_train_epochs=budget.teacher_epochs,
                                       learning_rate=budget.teacher_lr, distillation={"alpha": 0.0}, **common)).final_dir
        student = dict(student_model=str(student_init), train_file=str(files["student_train"]), output_dir=str(root / "runs"),
                       num_train_epochs=budget.student_epochs, learning_rate=budget.student_lr, **common)
        build_teacher_cache(TrainingConfig(teacher_model=str(teacher), **student), root / "cache-64", top_k=64)
        port = free_port()
        server = serve(teacher, port)
        url = f"http://127.0.0.1:{port}/v1"
        runs = [("in_process", {"teacher_model": str(teacher)}), ("cache_top64", {"teacher_cache": str(root / "cache-64")})]
        runs += [(f"served_top{k}", {"teacher_url": url, "teacher_top_k": k}) for k in args.top_k]
        results = {}
        try:
            for name, extra in runs:
                figures = run_child({**student, "run_name": name, **extra})
                metrics = evaluate_model(figures.pop("final"), files["heldout"], settings=TokenizeSettings(max_seq_length=64),
                                         device="cpu", exact_match=True, max_new_tokens=4, batch_size=64)
                tokens = tokens_per_example(files["student_train"], student_init)
                results[name] = {"heldout_loss": round(metrics["loss"], 4), "accuracy": round(metrics["exact_match"], 3),
                                 "tokens_per_second": round(figures["samples_per_second"] * tokens, 1),
                                 "peak_rss_mb": figures["peak_rss_mb"], "train_seconds": round(figures["train_runtime"], 2)}
                if "wait_seconds" in figures:
                    results[name]["wait_seconds"] = figures["wait_seconds"]
                    results[name]["compute_seconds"] = round(figures["train_runtime"] - figures["wait_seconds"], 2)
        finally:
            server.kill()
            server.wait()
        base = results["in_process"]
        for name in results:
            results[name]["loss_vs_in_process"] = round(results[name]["heldout_loss"] / base["heldout_loss"] - 1, 4)
            results[name]["speed_vs_in_process"] = round(results[name]["tokens_per_second"] / base["tokens_per_second"], 3)
    print(json.dumps({"seed": args.seed, "vocab": tail_stats["vocab"], "tail_share": args.tail_share,
                      "results": results}, indent=2))


def tokens_per_example(path: Path, model_dir: Path) -> float:
    """Mean tokens per training example (prompt + completion), to turn samples/s into tokens/s."""
    from nlm.data.tokenize import TokenizeSettings, tokenize_records
    from nlm.models.loading import load_tokenizer

    dataset = tokenize_records([path], load_tokenizer(str(model_dir)), TokenizeSettings(max_seq_length=64)).dataset
    return sum(len(row) for row in dataset["input_ids"]) / len(dataset)


if __name__ == "__main__":
    main()
