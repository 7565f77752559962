"""`nlm demo`: build data and a tokenizer, train a teacher, distil one student, fine-tune another, compare.

Every step goes through the code a user runs: `train()` is `nlm train`, `evaluate_model()` is `nlm eval`.
The teacher is itself trained with `train()` (α=0, no teacher), from a randomly initialised model folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from nlm.apps.evaluate import evaluate_model
from nlm.apps.train import train
from nlm.config.paths import claim_folder, mark_folder, path_inside, record_written
from nlm.config.settings import TrainingConfig
from nlm.data.tokenize import TokenizeSettings
from nlm.demo.colours import write_jsonl
from nlm.demo.report import write_report
from nlm.demo.tasks import DemoBudget, DemoTaskSpec, get_task  # noqa: F401  (DemoBudget: re-exported)
from nlm.models.loading import count_parameters
from nlm.models.scratch import build_causal_lm, build_tokenizer

logger = logging.getLogger("nlm.demo")


class _Phases:
    """One progress line per phase, with the elapsed time and a rough ETA from the budget's proportions."""

    def __init__(self, names: list[str], weights: list[float]) -> None:
        self.names, self.weights = names, weights
        self.index, self.start, self.phase_start = 0, time.perf_counter(), time.perf_counter()

    def next(self) -> None:
        done = sum(self.weights[: self.index])
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (1 - done) if done > 0 else None
        eta_text = f", about {eta:.0f}s left" if eta is not None else ""
        print(f"[{self.index + 1}/{len(self.names)}] {self.names[self.index]} (elapsed {elapsed:.0f}s{eta_text})", flush=True)
        self.index += 1
        self.phase_start = time.perf_counter()


# What `nlm demo` writes directly inside its folder; `runs/` is marked on its own (it holds `nlm train` runs).
DEMO_ENTRIES = ("data", "tokenizer", "models", "report.json", "report.md", "curves.png", "*.partial")


def prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """The demo folder, marked as nlm's; an earlier demo is only replaced with `overwrite`, and then only
    what nlm wrote in it is removed."""
    return claim_folder(output_dir, created_by="nlm demo", owns=DEMO_ENTRIES, overwrite=overwrite,
                        exists_message=f"{output_dir} already holds a demo; pass --overwrite to replace it or "
                                       "--output_dir to write elsewhere")


def write_demo_data(root: Path, seed: int, task: DemoTaskSpec | None = None) -> dict[str, Path]:
    task = task or get_task("colours")
    data = task.build_data(seed)
    before = {name: _names(root / name) for name in ("data", "tokenizer")}  # a user's files kept by --overwrite
    files = {
        "teacher_train": write_jsonl(path_inside(root, "data/teacher_train.jsonl"), data.teacher_train),
        "student_train": write_jsonl(path_inside(root, "data/student_train.jsonl"), data.student_train),
        "heldout": write_jsonl(path_inside(root, "data/heldout.jsonl"), data.heldout),
    }
    tokenizer = build_tokenizer(task.corpus(data), vocab_size=400)
    tokenizer.save_pretrained(path_inside(root, "tokenizer"))
    # data/, tokenizer/ and models/ hold only what the marker of each lists: --overwrite removes exactly that.
    for name, names in before.items():
        record_written(root / name, "nlm demo", names)
    logger.info("demo data: %d teacher examples, %d student examples, %d held-out", len(data.teacher_train),
                len(data.student_train), len(data.heldout))
    return files


def initial_model(root: Path, name: str, layers: int, hidden: int, seed: int) -> Path:
    """A randomly initialised model folder, as a user's `student_model` would be a pretrained one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers,
                            num_heads=4, max_positions=64, seed=seed)
    folder = path_inside(root, f"models/{name}-init")
    before = _names(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record_written(folder, "nlm demo", before)
    record_written(root / "models", "nlm demo", [name for name in _names(root / "models") if name != folder.name])
    return folder


def _names(folder: Path) -> list[str]:
    return [entry.name for entry in folder.iterdir()] if folder.is_dir() else []


def _train(root: Path, run_name: str, student: Path, train_file: Path, epochs: float, lr: float, batch: int, seed: int,
           teacher: Path | None, log_format: str, distillation: dict[str, Any] | None = None
           ) -> tuple[Path, float, list[dict]]:
    import json

    config = TrainingConfig(
        student_model=str(student),
        teacher_model=str(teacher) if teacher else None,
        train_file=train_file,
        output_dir=root / "runs",
        run_name=run_name,
        num_train_epochs=epochs,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        per_device_train_batch_size=batch,
        max_seq_length=64,
        seed=seed,
        save_strategy="no",
        logging_steps=10,
        device_preference=["cpu"],
        distillation={"alpha": 0.5 if teacher else 0.0, **(distillation or {})},
    )
    started = time.perf_counter()
    result = train(config, log_format=log_format)
    seconds = time.perf_counter() - started
    history = json.loads((result.final_dir / "training_metadata.json").read_text())["log_history"]
    return result.final_dir, seconds, history


def run_demo(output_dir: Path, seed: int = 0, quick: bool = False, overwrite: bool = False, data_only: bool = False,
             log_format: str = "text", task: str = "colours") -> dict[str, Any]:
    """Run the whole demo; returns the report (also written as report.json/report.md/curves.png)."""
    spec = get_task(task)
    budget = spec.quick_budget if quick else spec.budget
    root = prepare_output(output_dir, overwrite)
    # (key, phase name, distillation overrides, uses the teacher); every student has the same budget.
    students: list[tuple[str, str, dict[str, Any] | None, bool]] = [("student_kd", "distilling the student", None, True)]
    if spec.on_policy is not None:
        students.append(("student_on_policy", f"distilling the on-policy student (lmbda={spec.on_policy['lmbda']})",
                         spec.on_policy, True))
    students.append(("student_ce", "fine-tuning the baseline student (alpha=0)", None, False))
    student_weight = 0.3 / len(students)
    phases = _Phases(
        ["writing data and tokenizer", "training the teacher on the full pool", *[s[1] for s in students],
         f"evaluating all {len(students) + 1} on held-out prompts"],
        [0.02, 0.6, *[student_weight] * len(students), 0.08],
    )
    phases.next()
    files = write_demo_data(root, seed, spec)
    if data_only:
        print(f"demo data written to {root / 'data'} and tokenizer to {root / 'tokenizer'}")
        return {"data": {k: str(v) for k, v in files.items()}, "tokenizer": str(root / "tokenizer")}

    mark_folder(root / "runs", "nlm demo", owns=(".cache",))  # each run inside is marked by `nlm train`
    teacher_init = initial_model(root, "teacher", budget.teacher_layers, budget.teacher_hidden, seed)
    student_init = initial_model(root, "student", budget.student_layers, budget.student_hidden, seed)
    phases.next()
    teacher, teacher_s, teacher_log = _train(root, "teacher", teacher_init, files["teacher_train"], budget.teacher_epochs,
                                             budget.teacher_lr, budget.batch_size, seed, None, log_format)
    runs = {"teacher": (teacher, teacher_s)}
    histories = {"teacher": teacher_log}
    for key, _, distillation, distilled in students:
        phases.next()
        folder, seconds, history = _train(root, key, student_init, files["student_train"], budget.student_epochs,
                                          budget.student_lr, budget.batch_size, seed, teacher if distilled else None,
                                          log_format, distillation)
        runs[key], histories[key] = (folder, seconds), history
    phases.next()
    settings = TokenizeSettings(max_seq_length=64)
    results: dict[str, Any] = {}
    for name, (folder, seconds) in runs.items():
        metrics = evaluate_model(folder, files["heldout"], teacher_path=teacher if name != "teacher" else None,
                                 batch_size=64, settings=settings, device="cpu", exact_match=True,
                                 max_new_tokens=spec.eval_max_new_tokens)
        from transformers import AutoModelForCausalLM

        params = count_parameters(AutoModelForCausalLM.from_pretrained(folder))[1]
        results[name] = {
            "accuracy": metrics["exact_match"], "loss": metrics["loss"], "perplexity": metrics["perplexity"],
            "teacher_agreement": metrics.get("teacher_agreement"), "teacher_kl": metrics.get("teacher_kl"),
            "params": params, "seconds": round(seconds, 2), "model": str(folder),
        }
    gap = results["teacher"]["accuracy"] - results["student_ce"]["accuracy"]
    results["gap_closed"] = (results["student_kd"]["accuracy"] - results["student_ce"]["accuracy"]) / gap if gap > 0 else None
    if spec.on_policy is not None:
        results["student_on_policy"]["lmbda"] = spec.on_policy["lmbda"]
        results["on_policy_gain"] = results["student_on_policy"]["accuracy"] - results["student_kd"]["accuracy"]
    results["task"], results["seed"], results["quick"] = spec.name, seed, quick
    results["data"] = {k: str(v) for k, v in files.items()}
    write_report(root, results, histories)
    return results
