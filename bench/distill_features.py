"""What each distillation feature of issue 12 buys on the demo task: held-out accuracy, loss and time.

Per seed: trains two teachers on the demo's full pool (the demo's teacher, and a second one of another depth
and initialisation), then students at equal steps on the small labelled set:
  fine_tuned         labels only (alpha=0), the baseline every feature should beat
  kd                 off-policy KD from teacher A (the demo's student)
  pruned_kd          a student made by `init-student` from teacher A's layers (keep_every), plain KD
  pruned_kd_hidden   the same pruned student + the hidden-state term (layers: auto, mse)
  mixture            off-policy KD from the 2-teacher mixture (average, weights 1:1)
  entropy_tau        off-policy KD with temperature_mode=entropy
and prints one JSON document (per-seed rows and the mean over seeds).

    .venv/bin/python bench/distill_features.py --seeds 0 1 2
    .venv/bin/python bench/distill_features.py --smoke          # tiny budget: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run_seed(seed: int, smoke: bool, student_epochs: float) -> dict[str, dict[str, Any]]:
    from nlm.apps.evaluate import evaluate_model
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig
    from nlm.data.tokenize import TokenizeSettings
    from nlm.demo.pipeline import DemoBudget, initial_model, write_demo_data
    from nlm.models.prune import init_student

    budget = DemoBudget.quick() if smoke else DemoBudget()
    epochs = 1.0 if smoke else student_epochs
    with tempfile.TemporaryDirectory(prefix="nlm-distill-features-") as scratch:
        root = Path(scratch)
        files = write_demo_data(root, seed)
        if smoke:  # a few hundred examples: the pipeline runs, the figures mean nothing
            for name, keep in (("teacher_train", 256), ("student_train", 64), ("heldout", 32)):
                lines = files[name].read_text().splitlines(keepends=True)[:keep]
                files[name].write_text("".join(lines))
        common: dict[str, Any] = dict(max_seq_length=64, seed=seed, save_strategy="no", logging_steps=50, device_preference=["cpu"],
                                      per_device_train_batch_size=budget.batch_size, lr_scheduler_type="cosine",
                                      warmup_steps=0.05, output_dir=root / "runs")

        def fit(name: str, student: Path, train_file: Path, epochs: float, lr: float, **extra: Any) -> tuple[Path, float]:
            started = time.perf_counter()
            final = train(TrainingConfig(run_name=name, student_model=str(student), train_file=train_file,
                                         num_train_epochs=epochs, learning_rate=lr, **common, **extra)).final_dir
            return final, time.perf_counter() - started

        teacher_a, _ = fit("teacher_a", initial_model(root, "teacher_a", budget.teacher_layers, budget.teacher_hidden, seed),
                           files["teacher_train"], budget.teacher_epochs, budget.teacher_lr, distillation={"alpha": 0.0})
        teacher_b, _ = fit("teacher_b", initial_model(root, "teacher_b", budget.teacher_layers - 1, budget.teacher_hidden, seed + 100),
                           files["teacher_train"], budget.teacher_epochs, budget.teacher_lr, distillation={"alpha": 0.0})
        student_init = initial_model(root, "student", budget.student_layers, budget.student_hidden, seed)
        pruned = init_student(str(teacher_a), root / "models" / "pruned", keep_every=max(2, budget.teacher_layers // 2))
        pruned_dir = Path(pruned["output"])
        teachers = [{"model": str(teacher_a), "weight": 1.0}, {"model": str(teacher_b), "weight": 1.0}]
        runs = {
            "fine_tuned": (student_init, {"distillation": {"alpha": 0.0}}),
            "kd": (student_init, {"teacher_model": str(teacher_a)}),
            "pruned_kd": (pruned_dir, {"teacher_model": str(teacher_a)}),
            "pruned_kd_hidden": (pruned_dir, {"teacher_model": str(teacher_a),
                                              "distillation": {"hidden_states": {"weight": 1.0, "loss": "mse", "layers": "auto"}}}),
            "mixture": (student_init, {"teachers": teachers}),
            "entropy_tau": (student_init, {"teacher_model": str(teacher_a),
                                           "distillation": {"temperature_mode": "entropy", "target_entropy": 1.0}}),
        }
        results: dict[str, Any] = {}
        for name, final in (("_teacher_a", teacher_a), ("_teacher_b", teacher_b)):
            metrics = evaluate_model(final, files["heldout"], settings=TokenizeSettings(max_seq_length=64), device="cpu",
                                     exact_match=True, max_new_tokens=4, batch_size=64)
            results[name] = {"accuracy": round(metrics["exact_match"], 4), "heldout_loss": round(metrics["loss"], 4)}
        for name, (student, extra) in runs.items():
            final, seconds = fit(name, student, files["student_train"], epochs, budget.student_lr, **extra)
            metrics = evaluate_model(final, files["heldout"], settings=TokenizeSettings(max_seq_length=64), device="cpu",
                                     exact_match=True, max_new_tokens=4, batch_size=64)
            results[name] = {"accuracy": round(metrics["exact_match"], 4), "heldout_loss": round(metrics["loss"], 4),
                             "seconds": round(seconds, 1)}
        results["_pruned_layers"] = pruned["layers"]
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--student_epochs", type=float, default=30.0, help="epochs of every student run (equal steps; "
                        "the demo's budget)")
    parser.add_argument("--smoke", action="store_true", help="tiny budget, one seed: checks the script works")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.smoke else args.seeds
    per_seed = {seed: run_seed(seed, args.smoke, args.student_epochs) for seed in seeds}
    names = [name for name in per_seed[seeds[0]] if not name.startswith("_")]
    mean = {name: {key: round(statistics.fmean(per_seed[s][name][key] for s in seeds), 4)
                   for key in ("accuracy", "heldout_loss", "seconds")} for name in names}
    print(json.dumps({"seeds": seeds, "student_epochs": 1.0 if args.smoke else args.student_epochs, "mean": mean,
                      "per_seed": per_seed, "note": "CPU shared with other jobs: compare times within one run"}, indent=2))


if __name__ == "__main__":
    main()
