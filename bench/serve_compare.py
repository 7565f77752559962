"""`nlm serve` vs `transformers serve` (without and with `--continuous-batching`) on the same model, side by side.

    .venv/bin/python bench/serve_compare.py [--concurrency 1 8 32] [--max_tokens 32] [--requests 32]

The model: a 6-layer Llama-family config (SmolLM2-135M's widths: 576 hidden, 9 heads, 3 KV heads) with a
49,152-token vocabulary, random weights, and a word-level tokenizer covering all 49,152 ids (so every id a
random model picks decodes to one word and is counted once), built into a temporary folder. Each server runs
as a real process on loopback, CPU, one after the other; for each concurrency C, C closed-loop clients send
`--requests` POST /v1/completions in total (greedy, `max_tokens` each), then C streaming requests measure the
time to the first token. Every server gets the same `--threads` (OMP_NUM_THREADS, default 1). Completion tokens come from each answer's `usage` (or, when streaming, its words).
Then the memory of an `nlm serve` process with 1 and with 3 LoRA students of the same base (one base copy,
PEFT adapters) gives the memory each extra student costs. Prints one JSON object.

Speculative decoding (issue 27), a separate run on a real target and its distilled draft:

    .venv/bin/python bench/serve_compare.py --draft_pair TARGET DRAFT --draft_prompts PROMPTS.jsonl \
        [--draft_concurrency 1 4 8] [--max_tokens 32]

serves TARGET alone, then TARGET with `--draft DRAFT`, on each engine of `--draft_engines nlm vllm` (default nlm),
and sends the same greedy requests (the
`prompt` of each line of PROMPTS.jsonl, at least the concurrency, closed loop) at each concurrency; reports
completion tokens/s of both, their ratio, the draft's acceptance from /metrics, and whether every output is
byte-identical between the two servers.

What nlm's front costs on one vLLM run (issue 28): `--ab_rounds N --model DIR` starts `nlm serve --engine vllm`
once and sends each level's closed loop through nlm's routes and straight to its vLLM child, alternating N rounds.

vLLM (issue 28): `--servers vllm nlm-vllm` adds plain vLLM's OpenAI server and `nlm serve --engine vllm` (the
same vLLM behind nlm's routes), both run by `--vllm_python` (default $NLM_VLLM_PYTHON, else .venv-vllm/bin/python
from `make setup-vllm`), with the same context (2560), batch cap (32 sequences) and dtype (the folder's own); `--model DIR` serves an
existing folder (e.g. SmolLM2-135M-Instruct from bench/realmodel.py) instead of the random model:

    .venv/bin/python bench/serve_compare.py --model DIR --servers vllm nlm-vllm nlm --concurrency 1 8 32 --skip_lora
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
import threading
import time
from pathlib import Path

import httpx

VOCAB = 49152


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def build_students(base: Path, root: Path, count: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for index in range(count):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        model.peft_config["default"].base_model_name_or_path = str(base)
        folder = root / f"student{index}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # set from --threads in main(); the same for every server


def start(command: list[str], health: str, port: int, wait_s: float = 600, env: dict[str, str] | None = None,
          log: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Run a server on loopback `port`; return it and its base URL once `health` answers 200. RuntimeError when it
    exits first or is not up within `wait_s` (it is killed then). `env`: the child's whole environment (default:
    this one, offline, quiet, with THREADS); `log`: a list its output is read into as it comes (default: dropped)."""
    if env is None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **THREADS}
    output = subprocess.DEVNULL if log is None else subprocess.PIPE
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.DEVNULL if log is None else subprocess.STDOUT,
                               text=True, env=env)
    if log is not None:  # read as it comes: the pipe must not fill up
        threading.Thread(target=lambda: log.extend(iter(process.stdout.readline, "")), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}")
        try:
            if httpx.get(f"{base}{health}", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    process.wait()
    raise RuntimeError(f"{command[:4]} did not start")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def prompt(index: int) -> str:
    return " ".join(f"w{(index * 7919 + k * 104729) % (VOCAB - 3) + 3}" for k in range(20))


async def closed_loop(base: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for index in counter:
            body = {"model": model, "prompt": prompt(index), "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            response = await http.post(f"{base}/v1/completions", json=body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"completion_tokens_per_s": round(tokens / elapsed, 1), "requests": requests, "completion_tokens": tokens,
            "p50_latency_s": round(statistics.median(latencies), 3),
            "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}


async def streaming_ttft(base: str, model: str, concurrency: int, max_tokens: int) -> dict:
    firsts: list[float] = []

    async def one(index: int, http: httpx.AsyncClient) -> None:
        body = {"model": model, "prompt": prompt(1000 + index), "max_tokens": max_tokens, "temperature": 0, "stream": True}
        started = time.perf_counter()
        async with http.stream("POST", f"{base}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("text"):
                    firsts.append(time.perf_counter() - started)
                    break

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(one(i, http) for i in range(concurrency)))
    firsts.sort()
    return {"ttft_p50_s": round(statistics.median(firsts), 3) if firsts else None,
            "ttft_p99_s": round(firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))], 3) if firsts else None}


async def texts_loop(base: str, model: str, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    """Closed loop over `prompts` (greedy): completion tokens/s and every text, by prompt index."""
    texts: dict[int, str] = {}
    tokens = 0
    counter = iter(range(len(prompts)))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for index in counter:
            body = {"model": model, "prompt": prompts[index], "max_tokens": max_tokens, "temperature": 0}
            response = await http.post(f"{base}/v1/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            texts[index] = answer["choices"][0]["text"]
            tokens += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {"completion_tokens_per_s": round(tokens / (time.perf_counter() - started), 2), "completion_tokens": tokens,
            "texts": [texts[i] for i in range(len(prompts))]}


def draft_metrics(base: str) -> dict:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    names = ("nlm_draft_acceptance_rate", "nlm_draft_accepted_tokens_per_verify_step", "nlm_draft_verify_steps_total")
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    return found


def draft_compare(target: Path, draft: Path, prompts_file: Path, levels: list[int], max_tokens: int,
                  engine: str = "nlm") -> dict:
    """TARGET alone vs TARGET + DRAFT on one engine (`nlm serve --engine nlm|vllm`): tokens/s per concurrency,
    identical outputs, acceptance."""
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines() if line.strip()]
    runs: dict = {}
    for name, extra in (("target_alone", []), ("target_with_draft", ["--draft", str(draft)])):
        port = free_port()
        command = [sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--engine", engine,
                   "--model", str(target), *extra, "--port", str(port), "--max_new_tokens_cap", "4096",
                   "--request_timeout", "3600", *(["--device", "cpu"] if engine == "nlm" else [])]
        process, base = start(command, "/ping", port, 1800 if engine == "vllm" else 600)
        try:
            model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
            asyncio.run(texts_loop(base, model, 1, prompts[:1], 4))  # warm-up
            runs[name] = {}
            for concurrency in levels:
                need = max(len(prompts), concurrency)
                figures = asyncio.run(texts_loop(base, model, concurrency, (prompts * need)[:need], max_tokens))
                figures["draft"] = draft_metrics(base) if extra else {}
                runs[name][str(concurrency)] = figures
                print(json.dumps({name: {concurrency: {k: v for k, v in figures.items() if k != "texts"}}}),
                      file=sys.stderr, flush=True)
        finally:
            stop(process)
    result = {"engine": engine, "target": str(target), "draft": str(draft), "max_tokens": max_tokens,
              "prompts": len(prompts), "levels": {}}
    for level in map(str, levels):
        alone, drafted = runs["target_alone"][level], runs["target_with_draft"][level]
        result["levels"][level] = {
            "target_alone_tokens_per_s": alone["completion_tokens_per_s"],
            "target_with_draft_tokens_per_s": drafted["completion_tokens_per_s"],
            "speedup": round(drafted["completion_tokens_per_s"] / alone["completion_tokens_per_s"], 2),
            "identical_outputs": alone["texts"] == drafted["texts"],
            "draft_metrics_cumulative": drafted["draft"]}
    return result


def front_vs_direct(folder: Path, levels: list[int], requests: int, max_tokens: int, rounds: int) -> dict:
    """What nlm's front costs on top of vLLM, with the vLLM run held fixed: one `nlm serve --engine vllm`, and at
    each concurrency the same closed loop sent through nlm's routes and straight to its vLLM child, alternating
    for `rounds` rounds. Separate vLLM starts differ by several percent from run to run on this CPU; one child
    measured both ways does not."""
    import re

    port, log = free_port(), []
    command = [sys.executable, "-m", "nlm.cli", "--log_level", "INFO", "serve", "--engine", "vllm", "--model", str(folder),
               "--port", str(port), "--request_timeout", "3600"]
    process, base = start(command, "/ping", port, 1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **THREADS}, log=log)
    try:
        child = re.search(r"vLLM for \S+ runs as pid \d+ on port (\d+)", "".join(log))
        assert child, "nlm serve did not log its vLLM child's port"
        routes = {"nlm_front": base, "vllm_direct": f"http://127.0.0.1:{child.group(1)}"}
        names = {via: httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] for via, url in routes.items()}
        asyncio.run(closed_loop(base, names["nlm_front"], 2, 2, 4))  # warm-up
        out: dict = {}
        for concurrency in levels:
            runs: dict = {via: [] for via in routes}
            for _ in range(rounds):
                for via, url in routes.items():
                    runs[via].append(asyncio.run(closed_loop(url, names[via], concurrency, max(requests, concurrency), max_tokens)))
            tokens = {via: sum(r["completion_tokens_per_s"] for r in rs) / rounds for via, rs in runs.items()}
            p99 = {via: max(r["p99_latency_s"] for r in rs) for via, rs in runs.items()}
            out[str(concurrency)] = {"runs": runs, "front_vs_direct_tokens_per_s": round(tokens["nlm_front"] / tokens["vllm_direct"], 3),
                                     "front_vs_direct_p99": round(p99["nlm_front"] / p99["vllm_direct"], 3)}
            print(json.dumps({concurrency: {k: v for k, v in out[str(concurrency)].items() if k != "runs"}}), file=sys.stderr, flush=True)
        return out
    finally:
        stop(process)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lora_memory(base_folder: Path, root: Path) -> dict:
    students = build_students(base_folder, root, 3)
    figures = {}
    for count in (1, 3):
        port = free_port()
        command = [sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--port", str(port), "--device", "cpu"]
        for index, folder in enumerate(students[:count]):
            command += ["--model", f"s{index}={folder}"]
        process, _ = start(command, "/ping", port)
        time.sleep(2)
        figures[count] = rss_mib(process.pid)
        stop(process)
    port = free_port()
    process, _ = start([sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--port", str(port), "--device", "cpu",
                        "--model", f"base={base_folder}"], "/ping", port)
    time.sleep(2)
    base_rss = rss_mib(process.pid)
    stop(process)
    return {"rss_base_only_mib": round(base_rss, 1), "rss_1_student_mib": round(figures[1], 1),
            "rss_3_students_mib": round(figures[3], 1), "mib_per_extra_student": round((figures[3] - figures[1]) / 2, 1),
            "lora": "r=16 on q,k,v,o"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least the concurrency)")
    parser.add_argument("--servers", nargs="+", default=["nlm", "transformers", "transformers_cb"])
    parser.add_argument("--skip_lora", action="store_true")
    parser.add_argument("--model", type=Path, help="serve this model folder instead of the random 6-layer model")
    parser.add_argument("--vllm_python", default=os.environ.get("NLM_VLLM_PYTHON") or str(Path(".venv-vllm/bin/python").resolve()),
                        help="the Python with vLLM installed (servers vllm and nlm-vllm)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of every server (OMP_NUM_THREADS); on a shared, oversubscribed CPU more "
                             "than 1 makes each op wait for descheduled sibling threads")
    parser.add_argument("--ab_rounds", type=int, default=0,
                        help="instead: nlm serve --engine vllm's front vs its own vLLM child, same process, this many "
                             "alternating rounds per concurrency (needs --model)")
    parser.add_argument("--draft_pair", nargs=2, type=Path, metavar=("TARGET", "DRAFT"),
                        help="instead: TARGET alone vs TARGET with its draft on nlm's engine (speculative decoding)")
    parser.add_argument("--draft_prompts", type=Path, help="JSONL with a `prompt` per line (--draft_pair)")
    parser.add_argument("--draft_concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--draft_engines", nargs="+", choices=["nlm", "vllm"], default=["nlm"],
                        help="engines to run --draft_pair on, one after the other (vllm: vLLM's draft-model "
                             "speculative decoding behind nlm serve, run by --vllm_python)")
    args = parser.parse_args()
    THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.draft_pair is not None:
        if args.draft_prompts is None:
            parser.error("--draft_pair needs --draft_prompts")
        if "vllm" in args.draft_engines:
            os.environ["NLM_VLLM_PYTHON"] = args.vllm_python
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        result = {engine: draft_compare(*args.draft_pair, args.draft_prompts, args.draft_concurrency, args.max_tokens, engine)
                  for engine in args.draft_engines}
        print(json.dumps({"engines": result, "server_threads": args.threads, "load_average": os.getloadavg()[0]}, indent=2))
        return
    if args.ab_rounds:
        if args.model is None:
            parser.error("--ab_rounds needs --model")
        os.environ["NLM_VLLM_PYTHON"] = args.vllm_python
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        result = front_vs_direct(args.model, args.concurrency, args.requests, args.max_tokens, args.ab_rounds)
        print(json.dumps({"model": str(args.model), "levels": result, "server_threads": args.threads,
                          "load_average": os.getloadavg()[0]}, indent=2))
        return
    transformers_cli = str(Path(sys.executable).with_name("transformers"))
    results: dict = {"model": str(args.model) if args.model else "llama 6x576, vocab 49152, random weights", "max_tokens": args.max_tokens,
                     "cpu_count": os.cpu_count(), "server_threads": args.threads, "load_average": os.getloadavg()[0],
                     "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or Path(tmp) / "model"
        if args.model is None:
            build_model(folder)
        for server in args.servers:
            port = free_port()
            wait_s = 600
            if server in ("vllm", "nlm-vllm"):  # the first start compiles for minutes on a CPU
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
                wait_s = 1800
            if server == "vllm":
                from nlm.inference.vllm_engine import folder_dtype

                command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                           "--served-model-name", folder.name, "--host", "127.0.0.1", "--port", str(port),
                           "--max-model-len", "2560", "--max-num-seqs", "32", "--seed", "0",
                           "--dtype", folder_dtype(folder)]  # as nlm-vllm does: the folder's own dtype
                health = "/health"
            elif server == "nlm-vllm":
                os.environ["NLM_VLLM_PYTHON"] = args.vllm_python
                command = [sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--engine", "vllm",
                           "--model", str(folder), "--port", str(port), "--request_timeout", "3600"]
                health = "/ping"
            elif server == "nlm":
                command = [sys.executable, "-m", "nlm.cli", "--log_level", "WARNING", "serve", "--engine", "nlm", "--model", str(folder),
                           "--port", str(port), "--device", "cpu", "--max_new_tokens_cap", "4096", "--request_timeout", "3600"]
                health = "/ping"
            else:
                command = [transformers_cli, "serve", str(folder), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"]
                command += ["--continuous-batching"] if server == "transformers_cb" else []
                health = "/health"
            process, base = start(command, health, port, wait_s)
            try:
                name = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
                asyncio.run(closed_loop(base, name, 2, 2, 4))  # warm-up
                levels = {}
                for concurrency in args.concurrency:
                    figures = asyncio.run(closed_loop(base, name, concurrency, max(args.requests, concurrency), args.max_tokens))
                    figures.update(asyncio.run(streaming_ttft(base, name, concurrency, args.max_tokens)))
                    levels[str(concurrency)] = figures
                    print(json.dumps({server: {concurrency: figures}}), file=sys.stderr, flush=True)
                results["servers"][server] = levels
            finally:
                stop(process)
        if "nlm" in results["servers"] and "transformers_cb" in results["servers"]:
            results["nlm_vs_transformers_cb_tokens_per_s"] = {
                c: round(results["servers"]["nlm"][c]["completion_tokens_per_s"]
                         / results["servers"]["transformers_cb"][c]["completion_tokens_per_s"], 2)
                for c in results["servers"]["nlm"] if c in results["servers"]["transformers_cb"]}
        if "vllm" in results["servers"] and "nlm-vllm" in results["servers"]:
            results["nlm_vllm_vs_vllm_tokens_per_s"] = {
                c: round(results["servers"]["nlm-vllm"][c]["completion_tokens_per_s"]
                         / results["servers"]["vllm"][c]["completion_tokens_per_s"], 2)
                for c in results["servers"]["nlm-vllm"] if c in results["servers"]["vllm"]}
        if not args.skip_lora:
            results["lora_students"] = lora_memory(folder, Path(tmp))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
