"""In-process generation engines on one model: nlm's continuous batcher vs transformers' `generate_batch`
(ContinuousBatchingManager, paged attention) vs static batches through `model.generate`. Prints JSON.

    .venv/bin/python bench/engine_compare.py [--requests 32] [--new_tokens 32]

The model is a 6-layer Llama-family config with a 49,152-token vocabulary (SmolLM2's shape, fewer layers),
random weights, built here; greedy decoding, no EOS (every request makes exactly --new_tokens tokens).
All engines run in this one process, one after the other, so they share the same (possibly busy) CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch


def build_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


class _Ids:
    """A stand-in tokenizer: the engines here only move token ids."""

    pad_token_id, eos_token_id = 0, None

    def __call__(self, text: str, **kwargs: object) -> dict:
        return {"input_ids": [1, 5, 6]}

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return " ".join(map(str, ids))


def run_nlm(model, prompts, new_tokens) -> float:
    from nlm.inference.engine import GenerationEngine, GenerationJob, SamplingKey

    greedy = SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)
    engine = GenerationEngine(model, _Ids(), max_batch_size=len(prompts))
    engine.eos_ids = set()
    engine.warm_up()
    engine.start()

    async def go():
        return await asyncio.gather(*(engine.generate(GenerationJob(p, new_tokens, greedy)) for p in prompts))

    start = time.perf_counter()
    asyncio.run(go())
    elapsed = time.perf_counter() - start
    engine.stop()
    return elapsed


def run_transformers_cb(model, prompts, new_tokens) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.inference_mode():
        model.generate_batch(prompts[:2], generation_config=config, max_new_tokens=2)  # warm-up
        start = time.perf_counter()
        model.generate_batch(prompts, generation_config=config, max_new_tokens=new_tokens)
        return time.perf_counter() - start


def run_static(model, prompts, new_tokens, batch) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            group = prompts[i:i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args()
    model = build_model()
    prompts = [[1] + torch.randint(5, 49000, (20 + i % 7,)).tolist() for i in range(args.requests)]
    tokens = args.requests * args.new_tokens
    results = {}
    for name, run in (("nlm_continuous", lambda: run_nlm(model, prompts, args.new_tokens)),
                      ("transformers_generate_batch", lambda: run_transformers_cb(model, prompts, args.new_tokens)),
                      ("static_generate_batch8", lambda: run_static(model, prompts, args.new_tokens, 8))):
        results[name] = {"tokens_per_s": round(tokens / run(), 1)}
    print(json.dumps({"requests": args.requests, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
