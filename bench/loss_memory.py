"""Peak memory and time of one loss forward+backward: nlm fused vs nlm simple vs TRL's chunked divergence.

Inputs: 4,096 target tokens, hidden 1,024, fp32 on the CPU, vocabularies 32k / 128k / 256k; a student
head that trains and a frozen teacher head, both [V, 1024]. Each case runs in its own process; memory is
peak RSS (ru_maxrss) minus the RSS after the inputs exist, i.e. what the loss itself adds. A case whose
estimated need exceeds the machine is reported as not run. TRL's function computes the divergence only
(no cross-entropy term); nlm's computes both.

    .venv/bin/pip install -r bench/requirements.txt    # TRL, pinned
    .venv/bin/python bench/loss_memory.py [--tokens 4096] [--hidden 1024] [--vocab 32768 131072 262144]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_bytes  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(impl: str, vocab: int, tokens: int, hidden: int) -> dict:
    import torch

    torch.manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, requires_grad=True)
    student_head = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden)
    teacher_head = torch.randn(vocab, hidden) * 0.02
    targets = torch.randint(0, vocab, (tokens,))
    baseline = rss_bytes()

    def step() -> float:
        student_hidden.grad = None
        student_head.grad = None
        if impl == "simple":
            from nlm.distill.loss import distillation_loss

            student_logits = student_hidden @ student_head.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_head.T
            loss = distillation_loss(student_logits, teacher_logits, targets, alpha=0.5, temperature=2.0).total
        elif impl == "fused":
            from nlm.distill.engines.fused import dense_teacher_rows, fused_distillation_loss
            from nlm.distill.loss import LossSettings

            rows = dense_teacher_rows(teacher_hidden, lambda x: x @ teacher_head.T, vocab, torch.device("cpu"))
            loss = fused_distillation_loss(student_hidden, lambda x: x @ student_head.T, targets, rows, vocab_width=vocab,
                                           settings=LossSettings(alpha=0.5, temperature=2.0), linear_head=(student_head, None)).total
        elif impl == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            mask = torch.ones(1, tokens, dtype=torch.long)
            loss = _chunked_divergence_loss(student_hidden[None], teacher_hidden[None], student_head, teacher_head, mask,
                                            beta=0.0, temperature=2.0)[0]
        else:
            raise ValueError(impl)
        loss.backward()
        return float(loss)

    started = time.perf_counter()
    value = step()
    first = time.perf_counter() - started
    started = time.perf_counter()
    step()
    second = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {"impl": impl, "vocab": vocab, "tokens": tokens, "hidden": hidden, "loss": round(value, 5),
            "peak_extra_mib": round((peak - baseline) / 2**20, 1), "seconds": round(min(first, second), 3)}


def estimated_bytes(impl: str, vocab: int, tokens: int, hidden: int) -> int:
    """Rough need, from measurements: simple holds ~45 bytes per logit element; TRL's CPU path ~47 bytes per
    element of one 32k-vocabulary tile; the fused loss a few chunks."""
    inputs = 2 * vocab * hidden * 4 * 2 + tokens * hidden * 4 * 3
    if impl == "simple":
        return inputs + 48 * tokens * vocab + 2 * 2**30
    if impl == "trl":
        return inputs + 50 * tokens * min(vocab, 32768) + 2 * 2**30
    return inputs + 2 * 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--impls", nargs="+", default=["fused", "simple", "trl"])
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "VOCAB"), help=argparse.SUPPRESS)
    parser.add_argument("--memory_gib", type=float, default=20.0, help="skip cases estimated to need more")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.tokens, args.hidden)))
        return
    results = []
    for vocab in args.vocab:
        for impl in args.impls:
            # Full-logit paths grow linearly with tokens; where 4,096 tokens would not fit this machine, run fewer
            # and scale the measured peak to the requested count (marked "scaled_from_tokens").
            tokens = args.tokens
            while tokens > 256 and estimated_bytes(impl, vocab, tokens, args.hidden) > args.memory_gib * 2**30:
                tokens //= 2
            done = subprocess.run([sys.executable, __file__, "--case", impl, str(vocab), "--tokens", str(tokens),
                                   "--hidden", str(args.hidden)], capture_output=True, text=True)
            if done.returncode != 0:
                results.append({"impl": impl, "vocab": vocab, "failed": done.stderr.strip().splitlines()[-1:]})
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if tokens != args.tokens:
                    factor = args.tokens / tokens
                    result.update(scaled_from_tokens=tokens, measured_peak_extra_mib=result["peak_extra_mib"],
                                  peak_extra_mib=round(result["peak_extra_mib"] * factor, 1),
                                  measured_seconds=result["seconds"], seconds=round(result["seconds"] * factor, 3))
                results.append(result)
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    summary = {}
    for vocab in args.vocab:
        by_impl = {r["impl"]: r for r in results if r["vocab"] == vocab and "peak_extra_mib" in r}
        if "fused" in by_impl:
            entry = {}
            for other in ("simple", "trl"):
                if other in by_impl:
                    entry[f"fused_peak_over_{other}"] = round(by_impl["fused"]["peak_extra_mib"] / by_impl[other]["peak_extra_mib"], 3)
                    entry[f"fused_time_over_{other}"] = round(by_impl["fused"]["seconds"] / by_impl[other]["seconds"], 3)
            summary[str(vocab)] = entry
    print(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
