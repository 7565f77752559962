"""The λ sweep of the reverse demo (docs/BENCHMARKS.md, "λ sweep"): one more on-policy student per seed,
trained exactly as `nlm demo --task reverse` trains its students (same budget, data, initial student and
teacher; only `distillation.lmbda` differs), evaluated like them on the held-out prompts. Prints JSON.

    .venv/bin/python bench/reverse_lambda_sweep.py --seeds 0 1 2 --lmbda 1.0 [--root outputs/lambda-sweep] [--quick]

A seed whose demo folder (ROOT/seed-N) holds no finished demo gets one first (`nlm demo --task reverse
--seed N`: the teacher and the demo's own students, λ = 0.5 among them), so the figures of λ = 0, 0.5 and
the swept λ come from the same teacher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def sweep_seed(root: Path, seed: int, lmbda: float, quick: bool) -> dict:
    from nlm.apps.evaluate import evaluate_model
    from nlm.data.tokenize import TokenizeSettings
    from nlm.demo.pipeline import _train, run_demo
    from nlm.demo.tasks import get_task

    spec = get_task("reverse")
    budget = spec.quick_budget if quick else spec.budget
    if not (root / "report.json").is_file():
        run_demo(root, seed=seed, quick=quick, task="reverse")
    report = json.loads((root / "report.json").read_text())
    teacher = root / "runs" / "teacher" / "final"
    name = f"student_lmbda_{lmbda:g}".replace(".", "_")
    overrides = {**spec.on_policy, "lmbda": lmbda}
    folder, seconds, _ = _train(root, name, root / "models" / "student-init", root / "data" / "student_train.jsonl",
                                budget.student_epochs, budget.student_lr, budget.batch_size, seed, teacher, "text",
                                overrides)
    metrics = evaluate_model(folder, root / "data" / "heldout.jsonl", teacher_path=teacher, batch_size=64,
                             settings=TokenizeSettings(max_seq_length=64), device="cpu", exact_match=True,
                             max_new_tokens=spec.eval_max_new_tokens)
    results = report.get("results", report)
    demo = {key: results[key]["accuracy"] for key in ("student_kd", "student_on_policy") if key in results}
    return {"seed": seed, "lmbda": lmbda, "accuracy": metrics["exact_match"], "loss": metrics["loss"],
            "train_seconds": round(seconds, 1), "demo_off_policy_accuracy": demo.get("student_kd"),
            "demo_on_policy_accuracy": demo.get("student_on_policy"), "quick": quick}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lmbda", type=float, default=1.0)
    parser.add_argument("--root", type=Path, default=Path("outputs/lambda-sweep"))
    parser.add_argument("--quick", action="store_true", help="the demo's quick budget (checks the script)")
    args = parser.parse_args()
    rows = [sweep_seed(args.root / f"seed-{seed}", seed, args.lmbda, args.quick) for seed in args.seeds]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
