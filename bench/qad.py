"""Quantization-aware distillation vs post-training int4: held-out loss of fp32, PTQ int4 and QAD int4.

One model, three (four) folders scored by `nlm eval`'s scorer on the same held-out file:
(a) the fp32 model; (b) `nlm export --format int4` of it (PTQ); (c) a QAD run — `nlm train` with
`quantization_aware: {scheme: int4, group_size: G}`, the fp32 model as its own teacher, on the training
data — exported with `nlm export --format int4` (same scheme, same group size, so the same bytes);
with --control also (d) the same training budget without the fake quantizers, then PTQ (does the extra
training, rather than the quantization-awareness, explain the gain?). `gap_closed` = (b - c) / (b - a).

    .venv/bin/python bench/qad.py --demo            # the demo student (nlm demo --quick's student_kd)
    .venv/bin/python bench/qad.py --real            # SmolLM2-135M-Instruct (bench/realmodel.py), opt-in

Prints one JSON object per model. Figures in docs/BENCHMARKS.md come from a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _train(student: Path, train_file: Path, root: Path, name: str, args: argparse.Namespace, qad: bool) -> Path:
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig

    config = TrainingConfig(
        student_model=str(student), teacher_model=str(student), train_file=train_file, output_dir=root / "runs",
        run_name=name, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
        per_device_train_batch_size=args.batch, max_seq_length=args.seq, save_strategy="no", logging_steps=5,
        device_preference=["cpu"], seed=0, distillation={"alpha": args.alpha, "temperature": 1.0},
        quantization_aware={"scheme": "int4", "group_size": args.group_size} if qad else {},
    )
    return train(config).run_dir


def _score(folder: Path, heldout: Path, args: argparse.Namespace) -> float:
    from nlm.apps.evaluate import evaluate_model
    from nlm.data.tokenize import TokenizeSettings

    return evaluate_model(folder, heldout, batch_size=8, settings=TokenizeSettings(max_seq_length=args.seq),
                          device="cpu")["loss"]


def measure(name: str, student: Path, train_file: Path, heldout: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from nlm.apps.export import export_model

    started = time.perf_counter()
    fp32 = _score(student, heldout, args)
    ptq = export_model(student, root / "ptq", "int4", group_size=args.group_size)
    ptq_loss = _score(ptq.output_dir, heldout, args)
    qad_started = time.perf_counter()
    qad_run = _train(student, train_file, root, "qad", args, qad=True)
    qad_seconds = time.perf_counter() - qad_started
    qad = export_model(qad_run, root / "qad", "int4")
    qad_loss = _score(qad.output_dir, heldout, args)
    row: dict[str, Any] = {
        "model": name, "group_size": args.group_size, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "alpha": args.alpha, "seq": args.seq,
        "fp32_loss": round(fp32, 4), "ptq_int4_loss": round(ptq_loss, 4), "qad_int4_loss": round(qad_loss, 4),
        "ptq_gap_pct": round(100 * (ptq_loss - fp32) / fp32, 2), "qad_gap_pct": round(100 * (qad_loss - fp32) / fp32, 2),
        "gap_closed": round((ptq_loss - qad_loss) / (ptq_loss - fp32), 3) if ptq_loss > fp32 else None,
        "ptq_bytes": ptq.metadata["sizes"]["export_bytes"], "qad_bytes": qad.metadata["sizes"]["export_bytes"],
        "size_ratio": ptq.metadata["sizes"]["ratio"], "qad_train_seconds": round(qad_seconds, 1),
    }
    if args.control:
        plain_run = _train(student, train_file, root, "control", args, qad=False)
        control = export_model(plain_run, root / "control-ptq", "int4", group_size=args.group_size)
        row["control_fp32_loss"] = round(_score(plain_run / "final", heldout, args), 4)
        row["control_ptq_int4_loss"] = round(_score(control.output_dir, heldout, args), 4)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _demo(root: Path) -> tuple[Path, Path, Path]:
    from nlm.demo.pipeline import run_demo

    report = run_demo(root / "demo", quick=True)
    return Path(report["student_kd"]["model"]), Path(report["data"]["student_train"]), Path(report["data"]["heldout"])


def _real(root: Path) -> tuple[Path, Path, Path]:
    import realmodel

    train, held_out = realmodel.prose()
    return (realmodel.teacher_dir(), realmodel.write_jsonl([{"text": t} for t in train], root / "train.jsonl"),
            realmodel.write_jsonl([{"text": t} for t in held_out], root / "heldout.jsonl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the demo's distilled student")
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (opt-in)")
    parser.add_argument("--group_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="QAD steps (default: 200 demo, 40 real)")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 demo, 4 real")
    parser.add_argument("--seq", type=int, default=None, help="max tokens per record (default: 64 demo, 256 real)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 demo, 2e-5 real")
    parser.add_argument("--alpha", type=float, default=1.0, help="KD weight (1.0: match the fp32 self-teacher)")
    parser.add_argument("--control", action="store_true", help="also: same training without QAD, then PTQ")
    args = parser.parse_args()
    if not (args.demo or args.real):
        parser.error("give --demo and/or --real")
    for which, load, defaults in (("demo", _demo, (200, 16, 64, 1e-3)), ("real", _real, (40, 4, 256, 2e-5))):
        if not getattr(args, which):
            continue
        run = argparse.Namespace(**vars(args))
        for key, value in zip(("steps", "batch", "seq", "lr"), defaults, strict=True):
            if getattr(run, key) is None:
                setattr(run, key, value)
        with tempfile.TemporaryDirectory(prefix=f"nlm-qad-{which}-") as scratch:
            root = Path(scratch)
            student, train_file, heldout = load(root)
            name = "demo student_kd" if which == "demo" else "SmolLM2-135M-Instruct"
            print(json.dumps(measure(name, student, train_file, heldout, root, run)), flush=True)


if __name__ == "__main__":
    main()
