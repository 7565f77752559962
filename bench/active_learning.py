"""Active learning on the demo task: a student trained on the 30% of a pool chosen by disagreement vs a random 30%.

Per seed: the demo's data and teacher; a first student S0 trained (distilled) on the 384 labelled seed
examples; the pool is the rest of the labelled data (4,416 records, noisy labels). `nlm data select` keeps the
30% of the pool on which teacher and S0 disagree most (1 - top-1 agreement on completion tokens); a random
30% (seeded) is the control. Two students from the same initialisation are then distilled on seed set +
selection, with the same number of optimiser steps, and scored on the held-out prompts (greedy exact match).

    .venv/bin/python bench/active_learning.py [--seeds 0 1 2] [--fraction 0.3]
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
    args = parser.parse_args()

    from nlm.commands.data_select import Options, run
    from nlm.config.settings import TrainingConfig
    from nlm.data.tokenize import TokenizeSettings
    from nlm.demo.pipeline import DemoBudget, initial_model, write_demo_data
    from nlm.training.evaluate import evaluate_model
    from nlm.training.run import train

    budget = DemoBudget()
    report: dict = {"fraction": args.fraction, "by": args.by, "seeds": {}}
    for seed in args.seeds:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="nlm-active-") as scratch:
            root = Path(scratch)
            files = write_demo_data(root, seed)
            teacher_init = initial_model(root, "teacher", budget.teacher_layers, budget.teacher_hidden, seed)
            student_init = initial_model(root, "student", budget.student_layers, budget.student_hidden, seed)
            common = dict(max_seq_length=64, seed=seed, save_strategy="no", logging_steps=50, device_preference=["cpu"],
                          per_device_train_batch_size=budget.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
                          output_dir=root / "runs")
            teacher = train(TrainingConfig(student_model=str(teacher_init), train_file=files["teacher_train"], run_name="teacher",
                                           num_train_epochs=budget.teacher_epochs, learning_rate=budget.teacher_lr,
                                           distillation={"alpha": 0.0}, **common)).final_dir
            student = dict(student_model=str(student_init), teacher_model=str(teacher), learning_rate=budget.student_lr, **common)
            first = train(TrainingConfig(train_file=files["student_train"], run_name="s0",
                                         num_train_epochs=budget.student_epochs, **student)).final_dir

            seed_lines = files["student_train"].read_text().splitlines()
            seen = set(seed_lines)
            pool_lines = [line for line in files["teacher_train"].read_text().splitlines() if line not in seen]
            pool = root / "pool.jsonl"
            pool.write_text("\n".join(pool_lines) + "\n")
            count = round(args.fraction * len(pool_lines))
            chosen = root / "chosen.jsonl"
            run(Options(teacher=str(teacher), student=str(first), data=str(pool), output=str(chosen), count=count,
                        by=args.by, batch_size=64, device="cpu"))
            subsets = {args.by: chosen.read_text().splitlines(), "random": random.Random(seed).sample(pool_lines, count)}
            # The same number of example passes as the demo's student budget, whatever the set size.
            passes = budget.student_epochs * len(seed_lines)
            results = {}
            for name, lines in subsets.items():
                data = root / f"train-{name}.jsonl"
                data.write_text("\n".join(seed_lines + lines) + "\n")
                final = train(TrainingConfig(train_file=data, run_name=f"student-{name}",
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
