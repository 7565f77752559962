"""Profile of one nlm training step (live teacher or teacher cache) on the train_throughput setup.

Same models and data as bench/train_throughput.py (teacher llama 8x512, student 4x256, vocabulary 32,768,
batch 8, fp32 CPU). Trains `--steps` steps and profiles step `--profile_step` (after warm-up) with
torch.profiler; prints JSON: the step's wall time, and the top operators by self CPU time (and, with
`--python`, the top Python functions by cumulative time from cProfile over the same step).

    .venv/bin/python bench/profile_step.py --runner nlm_live [--top 20] [--python]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runner", choices=("nlm_live", "nlm_cached"), default="nlm_live")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile_step", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--python", action="store_true",
                        help="cProfile the step instead of torch.profiler, timed in process CPU time (robust to other "
                             "jobs on a shared machine; run with OMP_NUM_THREADS=1), sorted by own time")
    parser.add_argument("--shapes", action="store_true", help="group the operators by input shape too")
    args = parser.parse_args()

    import torch

    import nlm.apps.train as run_module
    from nlm.config.settings import TrainingConfig

    report: dict = {"runner": args.runner}

    def instrument(trainer) -> None:
        original = trainer.training_step
        calls = {"n": 0}

        def training_step(*a, **k):
            calls["n"] += 1
            if calls["n"] != args.profile_step:
                return original(*a, **k)
            started, cpu_started = time.perf_counter(), time.process_time()
            if args.python:
                profile = cProfile.Profile(timer=time.process_time)
                result = profile.runcall(original, *a, **k)
                report["step_seconds"] = round(time.perf_counter() - started, 3)
                report["step_cpu_seconds"] = round(time.process_time() - cpu_started, 3)
                out = io.StringIO()
                pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
                report["python_top_own_cpu"] = [line for line in out.getvalue().splitlines() if line.strip()][-args.top - 1:]
                return result
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
                result = original(*a, **k)
            report["step_seconds"] = round(time.perf_counter() - started, 3)
            report["step_cpu_seconds"] = round(time.process_time() - cpu_started, 3)
            averages = prof.key_averages(group_by_input_shape=args.shapes)
            total = sum(e.self_cpu_time_total for e in averages) or 1
            rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
            report["top_self_cpu"] = [{"op": e.key + (f" {e.input_shapes}" if args.shapes else ""), "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                                       "share": round(e.self_cpu_time_total / total, 3)} for e in rows]
            return result

        trainer.training_step = training_step

    with tempfile.TemporaryDirectory(prefix="nlm-profile-") as scratch:
        root = Path(scratch)
        train_throughput.build_assets(root, examples=args.batch * args.steps + 8, seed=0)
        if args.runner == "nlm_cached":
            train_throughput.build_cache(root, seed=0)
        original_install = run_module.install_callbacks
        run_module.install_callbacks = lambda trainer: (original_install(trainer), instrument(trainer))
        common = dict(student_model=str(root / "student"), train_file=root / "train.jsonl", max_steps=args.steps,
                      per_device_train_batch_size=args.batch, learning_rate=1e-4, seed=0, max_seq_length=512,
                      save_strategy="no", logging_steps=1000, device_preference=["cpu"], lr_scheduler_type="constant")
        if args.runner == "nlm_cached":
            config = TrainingConfig(teacher_cache=root / "cache", output_dir=root / "out", overwrite=True, **common)
        else:
            config = TrainingConfig(teacher_model=str(root / "teacher"), output_dir=root / "out", overwrite=True, **common)
        run_module.train(config)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
