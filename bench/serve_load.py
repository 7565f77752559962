"""Load benchmark of `nlm serve`: a real server process on loopback, a tiny model, closed-loop clients.

For each server setting (--max_batch_size 1, then the default 8) and each concurrency (1, 8, 32), N clients
send /invocations requests back to back; prints one JSON object with requests/s, generated tokens/s and
p50/p99 latency, and the batching speed-up at each concurrency.

    .venv/bin/python bench/serve_load.py [--requests_per_client 6] [--max_new_tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_model(folder: Path) -> None:
    from nlm.models.scratch import build_causal_lm, build_tokenizer

    texts = [f"the {a} {b} jumps over the {c}" for a in ("quick", "slow", "red") for b in ("fox", "dog") for c in ("log", "hill")]
    tokenizer = build_tokenizer(texts * 20, vocab_size=400)
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=128, num_layers=4, num_heads=4, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def start_server(folder: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--model", str(folder), "--port", str(port),
         "--max_batch_size", str(max_batch_size), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/ping", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


async def load(base: str, concurrency: int, per_client: int, max_new_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for round_ in range(per_client):
            body = {"prompt": f"the quick fox {index} {round_}", "max_new_tokens": max_new_tokens, "temperature": 0}
            started = time.perf_counter()
            response = await http.post(f"{base}/invocations", json=body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            used = response.json()["generation_config"]
            tokens += used["max_new_tokens"]  # an upper bound; EOS can stop earlier

    ping_latencies: list[float] = []
    finished = asyncio.Event()

    async def pinger(http: httpx.AsyncClient) -> None:
        """/ping must stay fast while generation is busy: it is sampled every 50 ms during the load."""
        while not finished.is_set():
            started = time.perf_counter()
            (await http.get(f"{base}/ping")).raise_for_status()
            ping_latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await http.post(f"{base}/invocations", json={"prompt": "warm", "max_new_tokens": 2})
        ping_task = asyncio.create_task(pinger(http))
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        wall = time.perf_counter() - started
        finished.set()
        await ping_task
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 4),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
        "ping_max_s": round(max(ping_latencies), 4) if ping_latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests_per_client", type=int, default=6)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    results: dict = {"max_new_tokens": args.max_new_tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        build_model(folder)
        for batch in (1, 8):
            process, base = start_server(folder, batch)
            try:
                results["runs"][f"max_batch_size={batch}"] = [
                    asyncio.run(load(base, c, args.requests_per_client, args.max_new_tokens)) for c in args.concurrency
                ]
            finally:
                process.terminate()
                process.wait(timeout=60)
    single, batched = results["runs"]["max_batch_size=1"], results["runs"]["max_batch_size=8"]
    results["batching_speedup"] = {
        str(s["concurrency"]): round(b["requests_per_s"] / s["requests_per_s"], 2) for s, b in zip(single, batched, strict=True)
    }
    results["p99_over_p50_batched"] = {str(b["concurrency"]): round(b["p99_s"] / b["p50_s"], 2) for b in batched}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
