"""GPU parts of bench/gpu_check.sh: `loss` (memory and time of the loss at GPU sizes), `bf16` (the fused loss
under the run's autocast against the simple path under the same autocast) and `train` (bf16 distillation
throughput with nlm's trainer, live teacher and teacher cache). One JSON line each, also written to
`--out FILE` as soon as it is known (the train part after each mode), so a run cut off by its timeout keeps
what it measured; `summary FILE...` prints one line per part file (bench/gpu_check.sh calls it)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' data sheets, most specific name first.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0}


def card_peak(name: str | None = None) -> float:
    """The dense bf16 peak of the card (TFLOP/s); an SXM H100/H200 when the card is not in the table."""
    name = name or _gpu_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), 989.0)


def step_flops(tokens: int, target_tokens: int, body_params: int, head_params: int, backward: bool) -> float:
    """FLOPs of one forward (2/param/token) or forward+backward (6/param/token): the body runs at every
    token, the output head only at target tokens (nlm's fused loss never multiplies the head elsewhere)."""
    per = 6 if backward else 2
    return per * (tokens * body_params + target_tokens * head_params)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run)"


def loss_part(tokens: int = 8192, hidden: int = 4096, vocab: int = 131072, smoke: bool = False) -> dict:
    from nlm.distill.engines.fused import dense_teacher_rows, fused_distillation_loss
    from nlm.distill.loss import LossSettings, distillation_loss

    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        tokens, hidden, vocab = 64, 32, 1000
    torch.manual_seed(0)
    h_s = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w_s = (torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
    h_t = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    w_t = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) * 0.02
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def simple():
        logits = h_s @ w_s.T
        with torch.no_grad():
            teacher = h_t @ w_t.T
        return distillation_loss(logits, teacher, targets).total

    def fused():
        rows = dense_teacher_rows(h_t, lambda x: x @ w_t.T, vocab, device)
        return fused_distillation_loss(h_s, lambda x: x @ w_s.T, targets, rows, vocab_width=vocab,
                                       settings=LossSettings(), linear_head=(w_s, None)).total

    def trl():
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        return _chunked_divergence_loss(h_s[None], h_t[None], w_s, w_t, torch.ones(1, tokens, device=device), beta=0.0,
                                        temperature=2.0)[0]

    results = {}
    for name, fn in (("fused", fused), ("simple", simple), ("trl", trl)):
        try:
            h_s.grad = w_s.grad = None
            base = _reset_peak()
            fn().backward()  # warm-up (and the peak)
            _sync()
            peak = _peak() - base
            h_s.grad = w_s.grad = None
            start = time.perf_counter()
            fn().backward()
            _sync()
            results[name] = {"peak_extra_gib": round(peak / 2**30, 3), "seconds": round(time.perf_counter() - start, 4)}
        except (torch.cuda.OutOfMemoryError, ImportError) as exc:
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"part": "loss_memory", "gpu": _gpu_name(), "dtype": "bf16", "tokens": tokens, "hidden": hidden,
            "vocab": vocab, "results": results}


def bf16_part(tokens: int = 4096, hidden: int = 4096, vocab: int = 131072, smoke: bool = False) -> dict:
    """Fused vs simple under bf16 autocast with fp32 master weights (what the Trainer does): the fused chunks
    must run their head products in bf16 as the simple path does inside the model's forward."""
    import torch.nn.functional as F

    from nlm.distill.engines.fused import fused_distillation_loss
    from nlm.distill.loss import LossSettings, distillation_loss

    device_type = "cpu" if smoke else "cuda"
    if smoke:
        tokens, hidden, vocab = 64, 32, 1000
    torch.manual_seed(0)
    h_s = torch.randn(tokens, hidden, device=device_type, requires_grad=True)
    w_s = (torch.randn(vocab, hidden, device=device_type) * 0.02).requires_grad_()
    teacher = torch.randn(tokens, vocab, device=device_type) * 2
    targets = torch.randint(0, vocab, (tokens,), device=device_type)

    def autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def run(kind: str) -> tuple[float, list[torch.Tensor]]:
        h_s.grad = w_s.grad = None
        if kind == "simple_bf16":
            with autocast():
                logits = F.linear(h_s, w_s)
            loss = distillation_loss(logits, teacher, targets).total
        else:
            loss = fused_distillation_loss(h_s, lambda x: F.linear(x, w_s), targets, lambda a, b: teacher[a:b],
                                           vocab_width=vocab, settings=LossSettings(), linear_head=(w_s, None),
                                           autocast=autocast if kind == "fused_bf16" else None).total
        loss.backward()
        _sync()
        return loss.item(), [h_s.grad.clone(), w_s.grad.clone()]

    def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b, strict=True))

    reference_loss, reference_grads = run("simple_bf16")
    fused_loss, fused_grads = run("fused_bf16")
    fp32_loss, fp32_grads = run("fused_fp32")
    return {"part": "bf16_fused_vs_simple", "gpu": _gpu_name(), "tokens": tokens, "hidden": hidden, "vocab": vocab,
            "loss_abs_diff": abs(fused_loss - reference_loss), "grad_rel_diff": relative(fused_grads, reference_grads),
            "fp32_fused_loss_abs_diff": abs(fp32_loss - reference_loss),
            "fp32_fused_grad_rel_diff": relative(fp32_grads, reference_grads)}


def _write(out: Path | None, result: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(result) + "\n")
        partial.replace(out)


def train_part(steps: int = 20, batch: int = 8, seq: int = 1024, smoke: bool = False, out: Path | None = None) -> dict:
    import random

    import nlm.apps.train as run_module
    from nlm.apps.teacher_cache import build_teacher_cache
    from nlm.config.settings import TrainingConfig
    from nlm.models.scratch import build_causal_lm, build_tokenizer

    root = Path(tempfile.mkdtemp(prefix="nlm-gpu-"))
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    tokenizer = build_tokenizer([" ".join(rng.choice(words) for _ in range(200)) for _ in range(200)], vocab_size=32000)
    sizes = {"teacher": dict(hidden_size=2048, num_layers=16, num_heads=16, intermediate_size=5632),
             "student": dict(hidden_size=1024, num_layers=16, num_heads=16, intermediate_size=2816)}
    if smoke:  # the same code on the CPU with tiny sizes, to check the script before spending device time
        steps, batch, seq = 5, 2, 32
        sizes = {"teacher": dict(hidden_size=64, num_layers=2, num_heads=4), "student": dict(hidden_size=32, num_layers=1, num_heads=4)}
    params, head_params = {}, {}
    for name, size in sizes.items():
        model = build_causal_lm("llama", vocab_size=len(tokenizer), max_positions=seq + 8, seed=0, **size)
        params[name] = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        head_params[name] = model.get_output_embeddings().weight.numel()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with (root / "train.jsonl").open("w") as handle:
        for _ in range(batch * steps + batch):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq))}) + "\n")

    marks: list[float] = []
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            marks.append(time.perf_counter())

    original = run_module.install_callbacks
    run_module.install_callbacks = lambda trainer: (original(trainer), trainer.add_callback(Timer()))
    common = dict(student_model=str(root / "student"), train_file=root / "train.jsonl", max_steps=steps, max_seq_length=seq,
                  per_device_train_batch_size=batch, learning_rate=1e-4, save_strategy="no", logging_steps=10,
                  precision="fp32" if smoke else "bf16", lr_scheduler_type="constant",
                  device_preference=["cpu"] if smoke else ["cuda"])
    results: dict = {}
    report = {"part": "train_throughput", "gpu": _gpu_name(), "teacher_params": params["teacher"],
              "student_params": params["student"], "batch": batch, "seq": seq, "steps": steps, "complete": False,
              "results": results}
    for mode in ("live", "cached"):
        marks.clear()
        _reset_peak()
        if mode == "live":
            config = TrainingConfig(teacher_model=str(root / "teacher"), output_dir=root / "out-live", **common)
        else:
            started = time.perf_counter()
            build_teacher_cache(TrainingConfig(teacher_model=str(root / "teacher"), **common), root / "cache", top_k=64, batch_size=8)
            results["cache_build_seconds"] = round(time.perf_counter() - started, 1)
            _reset_peak()
            config = TrainingConfig(teacher_cache=root / "cache", output_dir=root / "out-cached", **common)
        run_module.train(config)
        seconds = marks[-1] - marks[2]  # skip warm-up steps
        tokens = batch * seq * (len(marks) - 3)
        targets = batch * (seq - 1) * (len(marks) - 3)  # text records: every token but the first is a target
        flops = step_flops(tokens, targets, params["student"] - head_params["student"], head_params["student"], True)
        if mode == "live":
            flops += step_flops(tokens, targets, params["teacher"] - head_params["teacher"], head_params["teacher"], False)
        results[mode] = {"tokens_per_s": round(tokens / seconds), "peak_memory_gib": round(_peak() / 2**30, 2),
                         "mfu": round(flops / seconds / (card_peak() * 1e12), 4)}
        _write(out, report)  # the live figures survive a timeout during the cache build
    report["complete"] = True
    return report


def summary(result: dict | None, name: str) -> str:
    """One line for a part's JSON (or for a part that wrote nothing before its timeout)."""
    if result is None:
        return f"{name}: no result (cut off before its first figure)"
    part, figures = result.get("part", name), result.get("results", {})
    cut = "" if result.get("complete", True) else " [cut off: partial]"
    if part == "loss_memory":
        text = " | ".join(f"{k} " + (v["error"][:40] if "error" in v else f"{v['peak_extra_gib']} GiB {v['seconds']} s")
                          for k, v in figures.items())
    elif part == "bf16_fused_vs_simple":
        text = (f"loss diff {result['loss_abs_diff']:.2e} (fp32 {result['fp32_fused_loss_abs_diff']:.2e}), "
                f"grad rel diff {result['grad_rel_diff']:.2e} (fp32 {result['fp32_fused_grad_rel_diff']:.2e})")
    elif part == "train_throughput":
        text = " | ".join(f"{k} {v['tokens_per_s']} tok/s MFU {v['mfu']} peak {v['peak_memory_gib']} GiB"
                          for k, v in figures.items() if isinstance(v, dict))
    else:
        text = " | ".join(f"{k} " + ("ok" if isinstance(v, dict) and v.get("same_step1_loss") and v.get("fused_stayed_on")
                                     else str(v.get("error") or v.get("skipped") or "MISMATCH")[:60] if isinstance(v, dict)
                                     else "n/a") for k, v in figures.items())
    return f"{part}{cut}: {text}"


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "loss"
    if part == "summary":
        for path in map(Path, sys.argv[2:]):
            print(summary(json.loads(path.read_text()) if path.is_file() else None, path.stem), flush=True)
        sys.exit(0)
    smoke = "--smoke" in sys.argv  # CPU, tiny sizes: checks the script itself, measures nothing
    out_file = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
    if part == "train":
        result = train_part(smoke=smoke, out=out_file)
    else:
        result = {"loss": loss_part, "bf16": bf16_part}[part](smoke=smoke)
    _write(out_file, result)
    print(json.dumps(result), flush=True)
