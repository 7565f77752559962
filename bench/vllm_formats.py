"""Which `nlm export` formats vLLM serves as they are: each folder served by `nlm serve --engine vllm` (vLLM's
OpenAI server behind nlm's routes), one after the other, and its greedy answers set beside the nlm engine's
on the same folder (in this process).

    NLM_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/vllm_formats.py \
        --folder merged=DIR --folder int8=DIR --folder int4=DIR [--max_tokens 24]

Per folder: whether vLLM started and answered, the first lines of its error when not, and how many of the
prompts' greedy answers equal the nlm engine's. Prints one JSON object. int8 is a torchao folder: without
torchao in vLLM's Python (`make setup-vllm` does not install it) vLLM exits with an ImportError; put torchao on
the child's PYTHONPATH to try it. int4 is a compressed-tensors `pack-quantized` folder. What each gave:
docs/DEPLOY.md ("Which `nlm export` formats vLLM serves").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_compare import free_port, start, stop  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Distillation trains a small model to",
           "List three colours:", "Once upon a time", "The quick brown fox"]


def greedy(post, name: str, max_tokens: int) -> list[str]:
    answers = [post("/v1/completions", {"model": name, "prompt": p, "max_tokens": max_tokens, "temperature": 0})
               for p in PROMPTS]
    return [a["choices"][0]["text"] if "choices" in a else f"<error {a}>" for a in answers]


def through_vllm(name: str, folder: Path, max_tokens: int, wait_s: float) -> dict:
    port = free_port()
    lines: list[str] = []
    started = time.time()
    try:
        process, base = start([sys.executable, "-m", "nlm.cli", "serve", "--engine", "vllm", "--model", f"{name}={folder}",
                               "--port", str(port), "--request_timeout", "1200"],
                              "/ping", port, wait_s, env={**os.environ, "HF_HUB_OFFLINE": "1"}, log=lines)
    except RuntimeError:
        errors = [line.rstrip()[:300] for line in lines  # vLLM's own error lines, not nlm's report of them
                  if re.search(r"\w(Error|Exception)\b", line) and "nlm" not in line and "uvicorn" not in line][-4:]
        return {"served": False, "start_s": round(time.time() - started, 1), "errors": errors}
    start_s = round(time.time() - started, 1)
    try:
        texts = greedy(lambda path, body: httpx.post(f"{base}{path}", json=body, timeout=1200).json(), name, max_tokens)
        return {"served": True, "start_s": start_s, "texts": texts}
    finally:
        stop(process)


def through_nlm(name: str, folder: Path, max_tokens: int) -> list[str]:
    from fastapi.testclient import TestClient

    from nlm.inference.app import create_app
    from nlm.inference.settings import ServerSettings

    with TestClient(create_app(ServerSettings(model=folder, served_model_name=name))) as client:
        while client.get("/ping").status_code == 503 and client.get("/ping").json()["status"] == "loading":
            time.sleep(0.2)
        return greedy(lambda path, body: client.post(path, json=body).json(), name, max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--max_tokens", type=int, default=24)
    parser.add_argument("--wait_s", type=float, default=1500, help="longest vLLM start-up to wait for")
    args = parser.parse_args()
    results: dict = {"vllm_python": os.environ.get("NLM_VLLM_PYTHON"), "max_tokens": args.max_tokens, "formats": {}}
    for spec in args.folder:
        name, _, path = spec.partition("=")
        folder = Path(path)
        entry = through_vllm(name, folder, args.max_tokens, args.wait_s)
        if entry["served"]:
            reference = through_nlm(name, folder, args.max_tokens)
            entry["greedy_equal_to_nlm_engine"] = f"{sum(a == b for a, b in zip(entry['texts'], reference, strict=True))}/{len(PROMPTS)}"
        results["formats"][name] = entry
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
