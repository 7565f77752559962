"""One .gguf file for llama.cpp / Ollama, written with the `gguf` package (llama.cpp's own Python writer).

Hand-written because llama.cpp's converter script is not installable from the package index; this covers
the Llama family the way that script does: tensor names from gguf's own name map, q/k rows permuted into
llama.cpp's rotary layout for `llama`, hyper-parameters as GGUF keys, and the byte-level BPE tokenizer
(tokens, types, merges, special ids). Architectures outside `SUPPORTED` are refused with a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from nlm.errors import ConfigError

logger = logging.getLogger(__name__)

# transformers model_type -> gguf architecture; "permute": llama.cpp expects llama's q/k rows interleaved.
SUPPORTED: dict[str, dict[str, Any]] = {
    "llama": {"arch": "LLAMA", "permute": True},
    "mistral": {"arch": "LLAMA", "permute": True},
    "qwen2": {"arch": "QWEN2", "permute": False},
}
QUANT_TYPES = ("f16", "q8_0", "q4_0")


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (the inverse of transformers' reader)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(name: str, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """The stored array and its GGML type: norms and biases stay f32 (as llama.cpp does), matrices per `quant`."""
    import gguf

    if data.ndim < 2 or name.endswith(".bias"):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        # Rows that do not split into whole blocks cannot be quantized; llama.cpp keeps them in f16 too.
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def _tokenizer_fields(writer: Any, model_dir: Path, tokenizer: Any, n_vocab: int) -> None:
    import gguf

    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json: gguf export needs a fast (byte-level BPE) tokenizer")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError(f"{tokenizer_json}: gguf export supports byte-level BPE tokenizers (GPT-2/Llama-3/Qwen style); "
                          "this one is not")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
             else gguf.TokenType.NORMAL for i in range(len(tokens))]
    for i in range(len(tokens), n_vocab):  # the embedding may be padded past the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    for name in ("bos", "eos", "pad", "unk"):  # from the loaded tokenizer: it knows ids the files may leave implicit
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            special_vocab.special_token_ids[name] = token_id
    special_vocab.add_to_gguf(writer, quiet=True)


def write_gguf(model: Any, tokenizer: Any, model_dir: Path, output_file: Path, quant: str = "f16") -> Path:
    """Write `model` (a plain, unquantized HF causal LM) and its tokenizer to `output_file` as GGUF."""
    import gguf

    config = model.config
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"gguf export supports {', '.join(sorted(SUPPORTED))} models; this one is "
                          f"{config.model_type!r} (use --format merged, int8 or int4 instead)")
    if quant not in QUANT_TYPES:
        raise ConfigError(f"--quant {quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    spec = SUPPORTED[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, spec["arch"])
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    n_vocab = state["model.embed_tokens.weight"].shape[0]

    writer = gguf.GGUFWriter(str(output_file), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(model_dir).name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _tokenizer_fields(writer, Path(model_dir), tokenizer, n_vocab)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    for hf_name, data in state.items():
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"gguf export: no GGUF name for tensor {hf_name!r} of this {config.model_type} model")
        if spec["permute"] and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif spec["permute"] and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        stored, qtype = _tensor_type(hf_name, data, quant)
        writer.add_tensor(name, stored, raw_dtype=qtype if qtype not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("gguf (%s) written to %s", quant, output_file)
    return output_file
