"""Student quality trained from the teacher cache vs from the live teacher, on the demo task.

Trains the demo's teacher, then the same distilled student three ways — live teacher, cache with top-k 64,
cache with top-k 8 — and reports held-out loss and accuracy, bytes per cached token and cache build time.

    .venv/bin/python bench/cache_quality.py [--seed 0]
    .venv/bin/python bench/cache_quality.py --vocab 32768 --tail_share 0.3   # realistic vocabulary, long tail

`--vocab N` grows the demo tokenizer to exactly N tokens (filler words, so ids need int32 past 32,767) and
`--tail_share p` makes the teacher long-tailed: a share p of its training completions are a filler word
drawn from a Zipf law over all of them, so at the answer position the teacher keeps mass p spread over
tens of thousands of tokens — most of it outside any top-k.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top_k", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--vocab", type=int, default=None, help="grow the tokenizer to exactly this many tokens")
    parser.add_argument("--tail_share", type=float, default=0.0, help="share of teacher completions drawn from the tail")
    args = parser.parse_args()

    from nlm.apps.evaluate import evaluate_model
    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig
    from nlm.data.tokenize import TokenizeSettings
    from nlm.demo.pipeline import DemoBudget, initial_model, write_demo_data

    budget = DemoBudget()
    with tempfile.TemporaryDirectory(prefix="nlm-cache-quality-") as scratch:
        root = Path(scratch)
        files = write_demo_data(root, args.seed)
        tail_stats = long_tail(root, files, args.vocab, args.tail_share, args.seed)
        teacher_init = initial_model(root, "teacher", budget.teacher_layers, budget.teacher_hidden, args.seed)
        student_init = initial_model(root, "student", budget.student_layers, budget.student_hidden, args.seed)
        common = dict(max_seq_length=64, seed=args.seed, save_strategy="no", logging_steps=50, device_preference=["cpu"],
                      per_device_train_batch_size=budget.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05)
        teacher = train(TrainingConfig(student_model=str(teacher_init), train_file=files["teacher_train"], output_dir=root / "runs",
                                       run_name="teacher", num_train_epochs=budget.teacher_epochs, learning_rate=budget.teacher_lr,
                                       distillation={"alpha": 0.0}, **common)).final_dir
        student = dict(student_model=str(student_init), train_file=files["student_train"], output_dir=root / "runs",
                       num_train_epochs=budget.student_epochs, learning_rate=budget.student_lr, **common)
        results = {}
        runs = [("live", {"teacher_model": str(teacher)})]
        for k in args.top_k:
            started = time.perf_counter()
            manifest = build_teacher_cache(TrainingConfig(teacher_model=str(teacher), **student), root / f"cache-{k}", top_k=k)
            runs.append((f"cache_top{k}", {"teacher_cache": root / f"cache-{k}", "_build": time.perf_counter() - started,
                                           "_bytes": manifest["bytes_per_token"]}))
        for name, extra in runs:
            build, size = extra.pop("_build", None), extra.pop("_bytes", None)
            final = train(TrainingConfig(run_name=name, **student, **extra)).final_dir
            metrics = evaluate_model(final, files["heldout"], settings=TokenizeSettings(max_seq_length=64), device="cpu",
                                     exact_match=True, max_new_tokens=4, batch_size=64)
            results[name] = {"heldout_loss": round(metrics["loss"], 4), "accuracy": round(metrics["exact_match"], 3)}
            if build is not None:
                results[name].update(cache_build_seconds=round(build, 1), bytes_per_token=size)
        for name in results:
            results[name]["loss_vs_live"] = round(results[name]["heldout_loss"] / results["live"]["heldout_loss"] - 1, 4)
    print(json.dumps({"seed": args.seed, "vocab": tail_stats["vocab"], "tail_share": args.tail_share,
                      "results": results}, indent=2))


def long_tail(root: Path, files: dict[str, Path], vocab: int | None, tail_share: float, seed: int) -> dict:
    """Grow the tokenizer to `vocab` tokens with filler words; replace a `tail_share` of the teacher's
    completions by a Zipf-drawn filler word. The models built afterwards use the grown tokenizer."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    if vocab is not None and vocab > len(tokenizer):
        tokenizer.add_tokens([f"zz{i}" for i in range(vocab - len(tokenizer))])
        tokenizer.save_pretrained(str(root / "tokenizer"))
    fillers = [token for token in tokenizer.get_vocab() if token.startswith("zz")]
    if tail_share > 0 and fillers:
        rng = random.Random(seed)
        weights = [1 / (rank + 1) ** 1.1 for rank in range(len(fillers))]
        path = files["teacher_train"]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            if rng.random() < tail_share:
                row["completion"] = rng.choices(fillers, weights)[0]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"vocab": len(tokenizer)}


if __name__ == "__main__":
    main()
