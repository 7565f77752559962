"""Active learning on the demo task: a student trained on the 30% of a pool chosen by disagreement vs a random 30%.

The demo's task and teacher (task seed 0; the teacher trained for --teacher_epochs on all 4,800 labelled
examples). Per seed: a first student S0 distilled on the 384 labelled seed examples (8 per object); the pool
is the rest of the labelled data (4,416 records, noisy labels). `nlm data select` keeps the
30% of the pool on which teacher and S0 disagree most (1 - top-1 agreement on completion tokens); a random
30% (seeded) is the control. Two students from the same initialisation are then distilled on seed set +
selection, with the same number of optimiser steps, and scored on the held-out prompts (greedy exact match).

    .venv/bin/python bench/active_learning.py [--seeds 0 1 2] [--fraction 0.3] [--teacher_epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--by", default="disagreement")
    parser.add_argument("--teacher_epochs", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fairest on a shared machine)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from nlm.apps.evaluate import evaluate_model
    from nlm.apps.train import train
    from nlm.commands.data_select import Options, run
    from nlm.config.settings import TrainingConfig
    from nlm.data.tokenize import TokenizeSettings
    from nlm.demo.pipeline import DemoBudget, initial_model, write_demo_data

    budget = DemoBudget()
    report: dict = {"fraction": args.fraction, "by": args.by, "teacher_epochs": args.teacher_epochs, "seeds": {}}
    with tempfile.TemporaryDirectory(prefix="nlm-active-") as scratch:
        root = Path(scratch)
        files = write_demo_data(root, 0)
        teacher_init = initial_model(root, "teacher", budget.teacher_layers, budget.teacher_hidden, 0)
        started = time.perf_counter()
        teacher = train(TrainingConfig(student_model=str(teacher_init), train_file=files["teacher_train"], run_name="teacher",
                                       num_train_epochs=args.teacher_epochs, learning_rate=budget.teacher_lr,
                                       distillation={"alpha": 0.0}, max_seq_length=64, seed=0, save_strategy="no",
                                       logging_steps=50, device_preference=["cpu"], per_device_train_batch_size=budget.batch_size,
                                       lr_scheduler_type="cosine", warmup_steps=0.05, output_dir=root / "runs")).final_dir
        teacher_eval = evaluate_model(teacher, files["heldout"], batch_size=64, settings=TokenizeSettings(max_seq_length=64),
                                      device="cpu", exact_match=True, max_new_tokens=4)
        report["teacher"] = {"accuracy": teacher_eval["exact_match"], "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps({"teacher": report["teacher"]}), flush=True)
        for seed in args.seeds:
            started = time.perf_counter()
            student_init = initial_model(root, f"student-{seed}", budget.student_layers, budget.student_hidden, seed)
            common = dict(max_seq_length=64, seed=seed, save_strategy="no", logging_steps=50, device_preference=["cpu"],
                          per_device_train_batch_size=budget.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
                          output_dir=root / "runs")
            student = dict(student_model=str(student_init), teacher_model=str(teacher), learning_rate=budget.student_lr, **common)
            first = train(TrainingConfig(train_file=files["student_train"], run_name=f"s0-{seed}",
                                         num_train_epochs=budget.student_epochs, **student)).final_dir

            seed_lines = files["student_train"].read_text().splitlines()
            seen = set(seed_lines)
            pool_lines = [line for line in files["teacher_train"].read_text().splitlines() if line not in seen]
            pool = root / f"pool-{seed}.jsonl"
            pool.write_text("\n".join(pool_lines) + "\n")
            count = round(args.fraction * len(pool_lines))
            chosen = root / f"chosen-{seed}.jsonl"
            run(Options(teacher=str(teacher), student=str(first), data=str(pool), output=str(chosen), count=count,
                        by=args.by, batch_size=64, device="cpu"))
            subsets = {args.by: chosen.read_text().splitlines(), "random": random.Random(seed).sample(pool_lines, count)}
            # The same number of example passes as the demo's student budget, whatever the set size.
            passes = budget.student_epochs * len(seed_lines)
            results = {}
            for name, lines in subsets.items():
                data = root / f"train-{name}-{seed}.jsonl"
                data.write_text("\n".join(seed_lines + lines) + "\n")
                final = train(TrainingConfig(train_file=data, run_name=f"student-{name}-{seed}",
                                             num_train_epochs=passes / (len(seed_lines) + len(lines)), **student)).final_dir
                metrics = evaluate_model(final, files["heldout"], batch_size=64, settings=TokenizeSettings(max_seq_length=64),
                                         device="cpu", exact_match=True, max_new_tokens=4)
                results[name] = {"accuracy": metrics["exact_match"], "loss": round(metrics["loss"], 4)}
            s0 = evaluate_model(first, files["heldout"], batch_size=64, settings=TokenizeSettings(max_seq_length=64),
                                device="cpu", exact_match=True, max_new_tokens=4)
            results["s0_seed_set_only"] = {"accuracy": s0["exact_match"], "loss": round(s0["loss"], 4)}
            results["pool"], results["selected"] = len(pool_lines), count
            results["seconds"] = round(time.perf_counter() - started, 1)
            report["seeds"][seed] = results
            print(json.dumps({"seed": seed, **results}), flush=True)
    accs = {name: [report["seeds"][s][name]["accuracy"] for s in args.seeds] for name in (args.by, "random")}
    report["mean_accuracy"] = {name: round(sum(v) / len(v), 4) for name, v in accs.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
