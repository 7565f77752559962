"""Draft students: acceptance and speed-up as the teacher's speculative-decoding draft, by training recipe.

The demo's `reverse` task (spell a made-up word backwards: multi-token answers). One teacher (llama config
4 layers x 128 hidden, task and teacher seed 0) is the target. Per seed, four drafts from the same student
initialisation (2 x 64, initialised with that seed), each measured with `nlm eval --draft_for TEACHER`
(`nlm.apps.draft_eval.evaluate_draft`: greedy, outputs checked identical to the teacher's alone):

    untrained   the initialisation itself
    fine_tuned  alpha=0 (labels only)
    kd          off-policy KD, the default objective (alpha 0.5, temperature 2, forward KL, lmbda 0)
    draft       the draft recipe: on-policy (lmbda 0.5, the student's own samples scored by the teacher),
                divergence tvd, temperature 1, alpha 0.5

The budget is fixed here (BUDGET, RECIPES) and was written before any draft was measured; every trained
draft has the same labelled words, epochs, batch and learning rate. Epochs, model sizes and labelled words are
the `reverse` demo's own (nlm/demo/tasks.py), which were fixed before this script existed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/draft_recipe.py [--seeds 0 1 2] [--output /tmp/draft-recipe]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BUDGET = {"teacher_epochs": 8.0, "student_epochs": 40.0, "lr": 2e-3, "batch": 32, "max_seq_length": 64,
          "eval_prompts": 100, "max_new_tokens": 12, "num_assistant_tokens": 4}
RECIPES = {
    "fine_tuned": {"alpha": 0.0},
    "kd": {"alpha": 0.5},
    "draft": {"alpha": 0.5, "lmbda": 0.5, "divergence": "tvd", "temperature": 1.0, "max_new_tokens": 12},
}
ORDER = ("untrained", "fine_tuned", "kd", "draft")


def train_model(root: Path, name: str, init: Path, train_file: Path, epochs: float, seed: int,
                teacher: Path | None, distillation: dict) -> Path:
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig

    config = TrainingConfig(
        student_model=str(init), teacher_model=str(teacher) if teacher else None, train_file=train_file,
        output_dir=root / "runs", run_name=name, num_train_epochs=epochs, learning_rate=BUDGET["lr"],
        lr_scheduler_type="cosine", warmup_steps=0.05, per_device_train_batch_size=BUDGET["batch"],
        max_seq_length=BUDGET["max_seq_length"], seed=seed, save_strategy="no", logging_steps=50,
        device_preference=["cpu"], distillation=distillation)
    return train(config, log_format="json").final_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("/tmp/draft-recipe"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nlm.apps.draft_eval import evaluate_draft
    from nlm.demo.pipeline import initial_model, write_demo_data
    from nlm.demo.tasks import get_task

    started = time.perf_counter()
    spec = get_task("reverse")
    args.output.mkdir(parents=True, exist_ok=True)
    teacher_root = args.output / "teacher"
    files = write_demo_data(teacher_root, 0, spec)
    heldout = args.output / "prompts.jsonl"
    lines = files["heldout"].read_text().splitlines()[: BUDGET["eval_prompts"]]
    heldout.write_text("\n".join(lines) + "\n")
    teacher_init = initial_model(teacher_root, "teacher", 4, 128, 0)
    teacher = train_model(teacher_root, "teacher", teacher_init, files["teacher_train"], BUDGET["teacher_epochs"], 0,
                          None, {"alpha": 0.0})
    rows = []
    for seed in args.seeds:
        root = args.output / f"seed{seed}"
        root.mkdir(exist_ok=True)
        (root / "tokenizer").mkdir(exist_ok=True)
        for item in (teacher_root / "tokenizer").iterdir():
            (root / "tokenizer" / item.name).write_bytes(item.read_bytes())
        drafts = {"untrained": initial_model(root, "student", 2, 64, seed)}
        for name, distillation in RECIPES.items():
            drafts[name] = train_model(root, name, drafts["untrained"], files["student_train"],
                                       BUDGET["student_epochs"], seed, None if distillation["alpha"] == 0 else teacher,
                                       distillation)
        for name in ORDER:
            result = evaluate_draft(drafts[name], teacher, heldout, max_new_tokens=BUDGET["max_new_tokens"],
                                    num_assistant_tokens=BUDGET["num_assistant_tokens"])
            rows.append({"seed": seed, "draft": name, **{k: result[k] for k in (
                "acceptance_rate", "tokens_per_target_forward", "speedup", "target_tokens_per_s",
                "speculative_tokens_per_s", "differing_outputs", "prompts")}})
            print(json.dumps(rows[-1]), flush=True)
    summary = {name: {key: statistics.mean(r[key] for r in rows if r["draft"] == name)
                      for key in ("acceptance_rate", "tokens_per_target_forward", "speedup")} for name in ORDER}
    print(json.dumps({"budget": BUDGET, "recipes": RECIPES, "rows": rows, "mean": summary,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
