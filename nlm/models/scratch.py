"""Small models and tokenizers built locally from configs: for the demo, tests and benchmarks (no downloads)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# A minimal ChatML-style template: enough for chat records and the OpenAI chat route.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_causal_lm(
    model_type: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """A randomly initialised causal LM of `model_type`, built from a config (no weights downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        "gpt2": {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads, "n_positions": max_positions},
        "opt": {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                "ffn_dim": intermediate_size or 4 * hidden_size, "max_position_embeddings": max_positions,
                "word_embed_proj_dim": hidden_size},
    }.get(model_type, {
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads, "intermediate_size": intermediate_size or 4 * hidden_size,
        "max_position_embeddings": max_positions,
    })
    if model_type == "gemma":
        sizes["head_dim"] = hidden_size // num_heads
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **sizes, **overrides)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, name):
            setattr(config, name, {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}[name])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
