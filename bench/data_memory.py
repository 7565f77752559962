"""Peak memory of tokenising a large JSONL file: 1,000,000 prompt/completion lines by default.

Writes the file, then tokenises it in a fresh process through nlm's data path (streaming reader ->
Arrow writer -> on-disk dataset) and reports wall time and peak RSS of that process, with the RSS
before tokenisation (interpreter, torch and transformers imported, tokenizer built) for reference.

    .venv/bin/python bench/data_memory.py [--lines 1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_bytes  # noqa: E402


def child(path: Path, cache: Path) -> dict:
    from nlm.data.tokenize import TokenizeSettings, tokenize_records
    from nlm.models.scratch import build_tokenizer

    tokenizer = build_tokenizer([path.read_text(encoding="utf-8")[:200_000]], vocab_size=2000)
    with open("/proc/self/statm") as handle:
        before = int(handle.read().split()[1]) * 4096
    started = time.perf_counter()
    data = tokenize_records([path], tokenizer, TokenizeSettings(max_seq_length=256), cache_root=cache)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {"examples": len(data.dataset), "target_tokens": data.stats.target_tokens, "seconds": round(seconds, 1),
            "rss_before_mib": round(before / 2**20), "peak_rss_mib": round(peak / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while teacher and student share one tokenizer".split()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "big.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for i in range(args.lines):
                prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
                handle.write(json.dumps({"prompt": f"{i}: {prompt}", "completion": " ".join(rng.choice(words) for _ in range(20))}) + "\n")
        size = path.stat().st_size
        done = subprocess.run([sys.executable, __file__, "--child", str(path), str(Path(scratch) / "cache")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(lines=args.lines, file_mib=round(size / 2**20))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
