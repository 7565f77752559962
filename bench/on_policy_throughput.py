"""On-policy distillation throughput, side by side: nlm (`distillation.lmbda=1`) vs TRL's GKDTrainer (`lmbda=1`).

Same models as bench/train_throughput.py (teacher llama 8x512, student 4x256, vocabulary 32,768, fp32 on the
CPU), same chat prompts (~125 tokens), same seed, batch, sampling (temperature 1, no top-k/top-p) and
generation length (--max_new_tokens; the untrained student almost never samples EOS, so every completion is
about that long in both). Both compute a pure forward KL on the completion tokens (TRL: beta=0; nlm:
divergence forward_kl at temperature 1; an on-policy step in nlm has no CE term). Each runner trains in its
own process; runners alternate and repeat; medians are printed.

    .venv/bin/python -m pip install -r bench/requirements.txt     # trl==1.16.0
    .venv/bin/python bench/on_policy_throughput.py [--steps 4] [--repeats 2] [--max_new_tokens 64] [--threads 1]

tokens/s = (generated tokens + trained tokens) / seconds, over the optimiser steps after the first
(warm-up); trained tokens are the prompt + completion tokens the loss pass runs over. Peak RSS is the
process's maximum resident set (models, generation, training).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_mib  # noqa: E402
from train_throughput import StepTimer, build_assets  # noqa: E402  (one owner of the models and data)

RUNNERS = ("nlm_on_policy", "trl_gkd")


class TokenCounter:
    """(generated, trained) tokens per generation call, in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def after_first(self) -> tuple[int, int]:
        timed = self.calls[1:]  # the first step is warm-up, as for the timer
        return sum(g for g, _ in timed), sum(t for _, t in timed)


def run_nlm(root: Path, steps: int, batch: int, seed: int, max_new_tokens: int) -> dict:
    import nlm.apps.train as run_module
    import nlm.training.policy as policy_module
    from nlm.config.settings import TrainingConfig

    timer, counter = StepTimer(), TokenCounter()
    original_callbacks, original_sample = run_module.install_callbacks, policy_module.sample_completions
    run_module.install_callbacks = lambda trainer: (original_callbacks(trainer), trainer.add_callback(timer.callback()))

    def counted(model, prompts, *args, **kwargs):
        completions = original_sample(model, prompts, *args, **kwargs)
        counter.calls.append((sum(map(len, completions)), sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))))
        return completions

    policy_module.sample_completions = counted
    config = TrainingConfig(
        teacher_model=str(root / "teacher"), student_model=str(root / "student"), train_file=root / "train.jsonl",
        output_dir=root / "out-nlm", overwrite=True, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-4, seed=seed, max_seq_length=512, save_strategy="no", logging_steps=1000,
        device_preference=["cpu"], lr_scheduler_type="constant",
        distillation={"lmbda": 1.0, "max_new_tokens": max_new_tokens, "generation_temperature": 1.0,
                      "temperature": 1.0, "divergence": "forward_kl"},
    )
    run_module.train(config)
    return {"seconds": timer.seconds(), "tokens": counter.after_first()}


def run_trl(root: Path, steps: int, batch: int, seed: int, max_new_tokens: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    timer, counter = StepTimer(), TokenCounter()
    original = GKDTrainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        ids, attention, labels = original(model, inputs, generation_config)
        generated = int((labels != -100).sum()) if labels is not None else 0
        counter.calls.append((generated, int(attention.sum())))
        return ids, attention, labels

    GKDTrainer.generate_on_policy_outputs = staticmethod(counted)
    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    # Prompts only: the collator builds the prompt from the messages before the last assistant turn.
    dataset = datasets.load_dataset("json", data_files=str(root / "train.jsonl"), split="train")
    args = GKDConfig(output_dir=str(root / "out-trl"), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=1e-4, seed=seed, lmbda=1.0, beta=0.0, temperature=1.0, max_new_tokens=max_new_tokens,
                     max_length=512, report_to="none", save_strategy="no", logging_steps=1000, use_cpu=True,
                     lr_scheduler_type="constant", disable_tqdm=True)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(root / "student"),
                         teacher_model=AutoModelForCausalLM.from_pretrained(root / "teacher"), args=args,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[timer.callback()])
    trainer.train()
    return {"seconds": timer.seconds(), "tokens": counter.after_first()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every runner alike (1 on a shared machine)")
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        runner = {"nlm_on_policy": run_nlm, "trl_gkd": run_trl}[args.runner]
        result = runner(Path(args.root), args.steps, args.batch, args.seed, args.max_new_tokens)
        print(json.dumps({"runner": args.runner, **result,
                          "peak_rss_mib": peak_rss_mib()}))
        return

    samples: dict[str, list[dict]] = {name: [] for name in args.runners}
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    if args.threads:  # oversubscribed OpenMP threads spin against other processes: on a shared machine use 1
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="nlm-bench-onpolicy-") as scratch:
        root = Path(scratch)
        build_assets(root, examples=args.batch * args.steps + 8, seed=args.seed)
        for repeat in range(args.repeats):
            for name in args.runners:  # alternate, so drift on a shared machine hits every runner alike
                done = subprocess.run(
                    [sys.executable, __file__, "--runner", name, "--root", str(root), "--steps", str(args.steps),
                     "--batch", str(args.batch), "--seed", str(args.seed), "--max_new_tokens", str(args.max_new_tokens)],
                    capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                generated, trained = result["tokens"]
                result["tokens_per_s"] = (generated + trained) / result["seconds"]
                result["generated_per_sequence"] = generated / (args.batch * (args.steps - 1))
                samples[name].append(result)
                print(f"repeat {repeat}: {name} {result['tokens_per_s']:.0f} tokens/s, {generated} generated, "
                      f"peak RSS {result['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    summary = {}
    for name, runs in samples.items():
        summary[name] = {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
            "generated_per_sequence": round(statistics.median(r["generated_per_sequence"] for r in runs), 1),
            "seconds_per_step": round(statistics.median(r["seconds"] / (args.steps - 1) for r in runs), 2),
            "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs)),
        }
    if "trl_gkd" in summary:
        for name in summary:
            summary[name]["speed_vs_trl"] = round(summary[name]["tokens_per_s"] / summary["trl_gkd"]["tokens_per_s"], 3)
            summary[name]["memory_vs_trl"] = round(summary[name]["peak_rss_mib"] / summary["trl_gkd"]["peak_rss_mib"], 3)
    print(json.dumps({"setup": {"teacher": "llama 8x512", "student": "llama 4x256", "vocab": 32768, "batch": args.batch,
                                "max_new_tokens": args.max_new_tokens, "steps_timed": args.steps - 1,
                                "repeats": args.repeats, "seed": args.seed, "threads": args.threads},
                      "results": summary}, indent=2))


if __name__ == "__main__":
    main()
