"""Training from vLLM vs from `nlm serve` vs the in-process teacher, on the real pair (issue 30).

The teacher is SmolLM2-135M-Instruct (fp32, `make setup-real`), the student its 6-layer importance cut
(`bench/real_distill.py` makes it), the data the real-model benchmark's prose. Each row trains the same student
for the same steps in its own process (so its peak RSS is its own) and reports training tokens/s, the student
process's peak RSS, the last logged training loss and, for the served rows, the time the trainer waited on the
server vs computed:

- in_process@2, in_process@1: the teacher inside the trainer, with 2 and 1 torch threads;
- cache_top20@2: a top-20 teacher cache built first (its build time reported apart), then trained from;
- nlm_serve_top20: `nlm serve --engine nlm --max_logprobs 64` on loopback, `teacher_top_k: 20`;
- vllm_top20: vLLM's OpenAI server on loopback (`--max-logprobs 64 --no-enable-prefix-caching`), same K;
- nlm_serve_vllm_top20 (optional row): `nlm serve --engine vllm`, vLLM behind nlm's front, same K.

Server and trainer get one torch thread each (`OMP_NUM_THREADS=1`): on this 2-core machine two processes of
two threads each oversubscribe the cores (0.15-0.19x, docs/BENCHMARKS.md), and vLLM's engine core busy-polls
a core. On two machines each side has its own cores; here they share two.

    NLM_VLLM_PYTHON=/work/.venv-vllm/bin/python .venv/bin/python bench/served_teacher_vllm.py [--steps 16]

Needs `make setup-real` (the SmolLM2 folder) and `make setup-vllm` (the vLLM venv, or $NLM_VLLM_PYTHON).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodel  # noqa: E402
import served_teacher  # noqa: E402
from serve_compare import free_port, start, stop  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def threads(count: int) -> None:
    os.environ.update(OMP_NUM_THREADS=str(count), MKL_NUM_THREADS=str(count))


def mean_tokens(path: Path, model_dir: Path, max_seq_length: int) -> float:
    from nlm.data.tokenize import TokenizeSettings, tokenize_records
    from nlm.models.loading import load_tokenizer

    dataset = tokenize_records(
        [path], load_tokenizer(str(model_dir)), TokenizeSettings(max_seq_length=max_seq_length)
    ).dataset
    return sum(len(row) for row in dataset["input_ids"]) / len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="optimiser steps per row (batch 8, 96 tokens)")
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--root", type=Path, default=realmodel.DEFAULT_ROOT)
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["in_process@2", "in_process@1", "cache_top20@2", "nlm_serve_top20", "vllm_top20"],
    )
    parser.add_argument(
        "--vllm_python",
        default=os.environ.get("NLM_VLLM_PYTHON") or str(Path(".venv-vllm/bin/python").resolve()),
    )
    args = parser.parse_args()
    if any(row.startswith("vllm") for row in args.rows) and not Path(args.vllm_python).is_file():
        raise SystemExit(f"no vLLM at {args.vllm_python}: run `make setup-vllm` or set NLM_VLLM_PYTHON")

    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.config.settings import TrainingConfig

    teacher = realmodel.teacher_dir(args.root).resolve()
    student = (args.root / "student-6-importance").resolve()
    train_file = (args.root / "train.jsonl").resolve()
    if not (student / "config.json").is_file() or not train_file.is_file():
        raise SystemExit(
            f"{student} or {train_file} missing: run bench/real_distill.py --budget three_epochs first"
        )
    tokens = mean_tokens(train_file, student, 96)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="nlm-served-real-") as scratch:
        root = Path(scratch)
        base = dict(
            student_model=str(student),
            train_file=str(train_file),
            output_dir=str(root / "runs"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            max_seq_length=96,
            learning_rate=1e-3,
            lr_scheduler_type="linear",
            warmup_steps=2,
            seed=0,
            save_strategy="no",
            logging_steps=1,
            device_preference=["cpu"],
        )
        for row in args.rows:
            name, _, count = row.partition("@")
            threads(int(count or 1))
            extra: dict = {}
            server = None
            if name == "in_process":
                extra = {"teacher_model": str(teacher)}
            elif name.startswith("cache_top"):
                k = int(name.removeprefix("cache_top"))
                started = time.perf_counter()
                build_teacher_cache(
                    TrainingConfig(**base, teacher_model=str(teacher)), root / f"cache-{k}", top_k=k
                )
                results[f"{row}_build"] = {"seconds": round(time.perf_counter() - started, 1)}
                extra = {"teacher_cache": str(root / f"cache-{k}")}
            else:
                port = free_port()
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **ONE_THREAD}
                if name.startswith("vllm"):
                    command = [
                        args.vllm_python,
                        "-m",
                        "vllm.entrypoints.openai.api_server",
                        "--model",
                        str(teacher),
                        "--served-model-name",
                        "teacher",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--max-model-len",
                        "512",
                        "--max-logprobs",
                        "64",
                        "--dtype",
                        "float32",
                        "--no-enable-prefix-caching",
                        "--seed",
                        "0",
                    ]
                    server, url = start(
                        command, "/health", port, 1800, env={**env, "VLLM_CPU_KVCACHE_SPACE": "2"}
                    )
                else:  # nlm_serve: nlm's own engine; nlm_serve_vllm: nlm serve --engine vllm (vLLM behind nlm's front)
                    engine = "vllm" if name.startswith("nlm_serve_vllm") else "nlm"
                    command = [sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--engine", engine,
                               "--model", f"teacher={teacher}", "--port", str(port), "--max_logprobs", "64",
                               "--max_batch_size", "16", "--device", "cpu"]
                    if engine == "vllm":
                        env["NLM_VLLM_PYTHON"] = args.vllm_python
                    server, url = start(command, "/ping", port, 1800 if engine == "vllm" else 600, env=env)
                extra = {"teacher_url": f"{url}/v1", "teacher_top_k": args.top_k}
            try:
                figures = served_teacher.run_child({**base, "run_name": row.replace("@", "-t"), **extra})
            finally:
                if server is not None:
                    stop(server)
            history = json.loads((Path(figures.pop("final")) / "training_metadata.json").read_text()).get(
                "log_history", []
            )
            losses = [e["loss"] for e in history if "loss" in e]
            results[row] = {
                "tokens_per_second": round(figures["samples_per_second"] * tokens, 1),
                "train_seconds": round(figures["train_runtime"], 1),
                "peak_rss_mb": figures["peak_rss_mb"],
                "last_train_loss": losses[-1] if losses else None,
            }
            if "wait_seconds" in figures:
                results[row]["wait_seconds"] = figures["wait_seconds"]
                results[row]["compute_seconds"] = round(figures["train_runtime"] - figures["wait_seconds"], 1)
            print(json.dumps({row: results[row]}), flush=True)
    best = max(
        (r["tokens_per_second"] for n, r in results.items() if n.startswith("in_process")), default=None
    )
    for row in results.values():
        if best and "tokens_per_second" in row:
            row["speed_vs_best_in_process"] = round(row["tokens_per_second"] / best, 3)
    print(
        json.dumps(
            {
                "steps": args.steps,
                "batch": 8,
                "max_seq_length": 96,
                "mean_tokens_per_example": round(tokens, 1),
                "top_k": args.top_k,
                "cpu_count": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
