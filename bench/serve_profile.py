"""Where nlm's generation engine spends its time: cProfile inside the engine's worker thread, over one batch
of greedy requests on the model of bench/engine_compare.py (SmolLM2's shape, 6 layers, random weights, fp32).
Prints JSON: the share of the thread's busy time (time spent waiting for work excluded) in the matrix
products (`torch.nn.functional.linear`) and the top functions by own time.

    .venv/bin/python bench/serve_profile.py [--requests 8] [--new_tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_compare import _Ids, build_model  # noqa: E402  (the same model and stand-in tokenizer)

# Time the worker spends blocked for the next request or the batch window, not generating.
WAITS = ("acquire", "wait", "get", "sleep")


def profile_engine(requests: int, new_tokens: int) -> dict:
    from nlm.inference.engine import GenerationEngine, GenerationJob, SamplingKey

    model = build_model()
    prompts = [[1] + torch.randint(5, 49000, (20 + i % 7,)).tolist() for i in range(requests)]
    engine = GenerationEngine(model, _Ids(), max_batch_size=requests)
    engine.eos_ids = set()
    engine.warm_up()
    profiler = cProfile.Profile()
    work = engine._work

    def profiled_work() -> None:  # cProfile sees only its own thread: enable it inside the worker
        profiler.enable()
        try:
            work()
        finally:
            profiler.disable()

    engine._work = profiled_work  # type: ignore[method-assign]
    engine.start()
    greedy = SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)

    async def go() -> None:
        await asyncio.gather(*(engine.generate(GenerationJob(p, new_tokens, greedy)) for p in prompts))

    asyncio.run(go())
    engine.stop()
    stats = pstats.Stats(profiler)
    rows = [(func, own) for func, (_, _, own, _, _) in stats.stats.items()]  # type: ignore[attr-defined]
    total = sum(own for _, own in rows)
    waiting = sum(own for (_, _, name), own in rows if any(word in name for word in WAITS))
    busy = total - waiting
    linear = sum(own for (_, _, name), own in rows if name.endswith("linear>") or name == "linear")
    top = sorted(rows, key=lambda row: -row[1])[:8]
    return {"requests": requests, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "busy_seconds": round(busy, 3), "waiting_seconds": round(waiting, 3),
            "linear_share_of_busy": round(linear / busy, 3) if busy else None,
            "top_own_time": [{"function": f"{Path(file).name}:{line}:{name}", "seconds": round(own, 3)}
                             for (file, line, name), own in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(profile_engine(args.requests, args.new_tokens), indent=2))


if __name__ == "__main__":
    main()
