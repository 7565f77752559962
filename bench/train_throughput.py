"""Training throughput, side by side: nlm (fused, live teacher), nlm (teacher cache), TRL GKD, a plain loop.

Identical models (teacher 8 layers x 512, student 4 x 256, llama configs, vocabulary 32,768), identical data
(chat records of ~256 tokens, a word-level tokenizer with exactly 32,768 tokens so no path can shrink the
vocabulary), seed, batch 8, fp32 on the CPU. Each runner trains in its own process; runners alternate and
repeat; the script prints medians, ratios to TRL, peak RSS and model FLOP utilisation against this
machine's fp32 matmul peak, measured in the same script.

    .venv/bin/pip install -r bench/requirements.txt     # trl==1.16.0
    .venv/bin/python bench/train_throughput.py [--steps 6] [--repeats 3] [--threads N]
    .venv/bin/python bench/train_throughput.py --quick  # regression guard: nlm live vs the plain loop, < 1 min

`--quick` runs one nlm-live process and one plain-loop process (3 steps, 2 timed, batch 4, no TRL, no cache)
and prints their ratio with the commit; docs/BENCHMARKS.md records it, so a slowdown of the training path
shows up in the change that causes it. Per-repeat ratios are printed too: on a shared machine the ratio
within one repeat (runners back to back) is the figure to trust, not the absolute tokens/s.

Timing covers the optimiser steps after the first (warm-up) one: loading, tokenisation and cache
building are excluded for every runner alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_mib  # noqa: E402

VOCAB = 32768
SEQ_WORDS = 120  # words per turn; with the template, ~256 tokens per record
RUNNERS = ("nlm_live", "nlm_cached", "trl_gkd", "reference")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_assets(root: Path, examples: int, seed: int) -> None:
    """Word-level tokenizer of exactly VOCAB tokens, teacher and student folders, and a chat JSONL."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nlm.models.scratch import build_causal_lm

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB
    for name, layers, hidden, heads in (("teacher", 8, 512, 8), ("student", 4, 256, 4)):
        model = build_causal_lm("llama", vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                max_positions=512, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(seed)
    with (root / "train.jsonl").open("w") as handle:
        for _ in range(examples):
            user = " ".join(rng.choice(words) for _ in range(SEQ_WORDS))
            answer = " ".join(rng.choice(words) for _ in range(SEQ_WORDS))
            handle.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}) + "\n")


class StepTimer:
    """Wall time and input tokens of the steps after the first."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def callback(self):  # a TrainerCallback, built lazily so the module imports without transformers
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.marks.append(time.perf_counter())

        return _Callback()

    def seconds(self) -> float:
        return self.marks[-1] - self.marks[0]


def tokens_per_batch(root: Path, batch: int) -> int:
    """Non-padding tokens of one batch (records are all the same length by construction)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    record = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    return batch * len(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=False))


def targets_per_batch(root: Path, batch: int) -> int:
    """Target (assistant) tokens of one batch, counted by nlm's own tokenisation: where a head must run."""
    from transformers import AutoTokenizer

    from nlm.data.tokenize import TokenizeSettings, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    data = tokenize_records([root / "train.jsonl"], tokenizer, TokenizeSettings(max_seq_length=512))
    return batch * sum(label != -100 for label in data.dataset[0]["labels"][1:])


def run_nlm(root: Path, steps: int, batch: int, seed: int, cached: bool) -> float:
    import nlm.apps.train as run_module
    from nlm.config.settings import TrainingConfig

    timer = StepTimer()
    original = run_module.install_callbacks
    run_module.install_callbacks = lambda trainer: (original(trainer), trainer.add_callback(timer.callback()))
    common = dict(student_model=str(root / "student"), train_file=root / "train.jsonl", max_steps=steps,
                  per_device_train_batch_size=batch, learning_rate=1e-4, seed=seed, max_seq_length=512, save_strategy="no",
                  logging_steps=1000, device_preference=["cpu"], lr_scheduler_type="constant")
    if cached:  # the cache itself is built once, beforehand, in its own process (build_cache)
        config = TrainingConfig(teacher_cache=root / "cache", output_dir=root / "out-cached", overwrite=True, **common)
    else:
        config = TrainingConfig(teacher_model=str(root / "teacher"), output_dir=root / "out-live", overwrite=True, **common)
    run_module.train(config)
    return timer.seconds()


def build_cache(root: Path, seed: int) -> float:
    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.config.settings import TrainingConfig

    config = TrainingConfig(teacher_model=str(root / "teacher"), student_model=str(root / "student"), train_file=root / "train.jsonl",
                            max_seq_length=512, seed=seed, device_preference=["cpu"])
    started = time.perf_counter()
    build_teacher_cache(config, root / "cache", top_k=64, batch_size=8)
    return time.perf_counter() - started


def run_trl(root: Path, steps: int, batch: int, seed: int) -> float:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    timer = StepTimer()
    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    dataset = datasets.load_dataset("json", data_files=str(root / "train.jsonl"), split="train")
    args = GKDConfig(output_dir=str(root / "out-trl"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                     seed=seed, lmbda=0.0, beta=0.0, temperature=2.0, max_length=512, report_to="none", save_strategy="no",
                     logging_steps=1000, use_cpu=True, lr_scheduler_type="constant", disable_tqdm=True)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(root / "student"),
                         teacher_model=AutoModelForCausalLM.from_pretrained(root / "teacher"), args=args,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[timer.callback()])
    trainer.train()
    return timer.seconds()


def run_reference(root: Path, steps: int, batch: int, seed: int) -> float:
    """The floor: full logits for both models, F.kl_div, AdamW; no framework."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student").train()
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher").eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    marks = []
    for step in range(steps):
        chunk = rows[step * batch:(step + 1) * batch]
        ids = torch.tensor([tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in chunk])
        with torch.no_grad():
            teacher_logits = teacher(ids).logits
        logits = student(ids).logits
        kl = F.kl_div(F.log_softmax(logits / 2, -1), F.log_softmax(teacher_logits / 2, -1), log_target=True, reduction="batchmean")
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = 0.5 * ce + 0.5 * 4 * kl / ids.shape[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        marks.append(time.perf_counter())
    return marks[-1] - marks[0]


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def model_flops_per_token(root: Path, tokens: int, targets: int) -> dict[str, float]:
    """Model FLOPs per token: 6 per parameter for the student (forward + backward) plus 2 for the teacher
    (forward) when it runs (not with the cache); input embeddings and attention scores left out. The output
    head counts only at target tokens (`targets` of `tokens`): nlm's fused loss never multiplies it at prompt
    positions, so counting it everywhere would credit nlm with work it does not do."""
    from transformers import AutoModelForCausalLM

    def params(name: str) -> tuple[int, int]:
        model = AutoModelForCausalLM.from_pretrained(root / name)
        head = model.get_output_embeddings().weight.numel()
        return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel() - head, head

    (student_body, student_head), (teacher_body, teacher_head) = params("student"), params("teacher")
    share = targets / tokens
    flops = {}
    for label, head_share in (("targets_only", share), ("every_position", 1.0)):
        student = 6 * (student_body + head_share * student_head)
        flops[f"with_teacher_{label}"] = student + 2 * (teacher_body + head_share * teacher_head)
        flops[f"student_only_{label}"] = student
    flops["target_share"] = round(share, 4)
    return flops


def kind(runner: str) -> str:
    """Which FLOP count a runner does: nlm runs heads at target tokens only; TRL and the plain loop compute
    full logits at every position (prompt included)."""
    teacher = "student_only" if runner == "nlm_cached" else "with_teacher"
    return f"{teacher}_{'targets_only' if runner.startswith('nlm') else 'every_position'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every runner alike (1 on a shared machine)")
    parser.add_argument("--quick", action="store_true",
                        help="regression guard: nlm_live vs reference, 3 steps, batch 4, one repeat (under a minute)")
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.runner:
        args.runners, args.steps, args.batch, args.repeats = ["nlm_live", "reference"], 3, 4, 1
    if args.runner:
        root = Path(args.root)
        run = {"nlm_live": lambda: run_nlm(root, args.steps, args.batch, args.seed, cached=False),
               "nlm_cached": lambda: run_nlm(root, args.steps, args.batch, args.seed, cached=True),
               "trl_gkd": lambda: run_trl(root, args.steps, args.batch, args.seed),
               "reference": lambda: run_reference(root, args.steps, args.batch, args.seed),
               "build_cache": lambda: build_cache(root, args.seed)}[args.runner]
        seconds = run()
        print(json.dumps({"runner": args.runner, "seconds": seconds,
                          "peak_rss_mib": peak_rss_mib()}))
        return

    with tempfile.TemporaryDirectory(prefix="nlm-bench-") as scratch:
        root = Path(scratch)
        build_assets(root, examples=args.batch * args.steps + 8, seed=args.seed)
        per_batch = tokens_per_batch(root, args.batch)
        flops_per_token = model_flops_per_token(root, per_batch, targets_per_batch(root, args.batch))
        peak = matmul_peak_gflops()
        cache_seconds = None
        if "nlm_cached" in args.runners:
            done = subprocess.run([sys.executable, __file__, "--runner", "build_cache", "--root", str(root), "--seed", str(args.seed)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"cache build failed:\n{done.stderr[-4000:]}")
            cache_seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            cache_bytes = sum(f.stat().st_size for f in (root / "cache").glob("*.safetensors"))
        samples: dict[str, list[dict]] = {name: [] for name in args.runners}
        env = dict(os.environ)
        if args.threads:  # oversubscribed OpenMP threads spin against other processes: on a shared machine use 1
            env["OMP_NUM_THREADS"] = str(args.threads)
        for repeat in range(args.repeats):
            for name in args.runners:  # alternate, so drift on a shared machine hits every runner alike
                done = subprocess.run([sys.executable, __file__, "--runner", name, "--root", str(root), "--steps", str(args.steps),
                                       "--batch", str(args.batch), "--seed", str(args.seed)], capture_output=True, text=True,
                                      env=env)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["tokens_per_s"] = per_batch * (args.steps - 1) / result["seconds"]
                samples[name].append(result)
                print(f"repeat {repeat}: {name} {result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
    summary = {}
    for name, runs in samples.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        summary[name] = {
            "tokens_per_s": round(tps, 1), "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
            "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs)),
            "achieved_gflops": round(tps * flops_per_token[kind(name)] / 1e9, 1),
            "mfu": round(tps * flops_per_token[kind(name)] / (peak * 1e9), 4),
        }
    for base, label in (("trl_gkd", "trl"), ("reference", "reference")):
        if base not in summary:
            continue
        for name in summary:
            summary[name][f"speed_vs_{label}"] = round(summary[name]["tokens_per_s"] / summary[base]["tokens_per_s"], 3)
            summary[name][f"memory_vs_{label}"] = round(summary[name]["peak_rss_mib"] / summary[base]["peak_rss_mib"], 3)
            # Within one repeat the runners ran back to back: the spread of these is the measurement's noise.
            summary[name][f"speed_vs_{label}_per_repeat"] = [
                round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(samples[name], samples[base], strict=True)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    print(json.dumps({"setup": {"commit": (commit.stdout.strip() or None) and commit.stdout.strip() + ("+dirty" if dirty else ""),
                                "quick": args.quick, "threads": args.threads,
                                "teacher": "llama 8x512", "student": "llama 4x256", "vocab": VOCAB, "batch": args.batch,
                                "tokens_per_batch": per_batch, "steps_timed": args.steps - 1, "repeats": args.repeats,
                                "matmul_peak_gflops_fp32": round(peak, 1), "model_flops_per_token": flops_per_token,
                                "cache_build_seconds": cache_seconds and round(cache_seconds, 1),
                                "cache_bytes": cache_bytes if cache_seconds else None},
                      "results": summary}, indent=2))


if __name__ == "__main__":
    main()
