"""Load tokenizers and causal LMs by hub id or local folder, failing early with the likely cause."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from nlm.errors import ModelLoadError, ModelPathError

logger = logging.getLogger(__name__)


def _hint(name: str, exc: Exception) -> str:
    text = str(exc)
    if "trust_remote_code" in text:
        return "this model ships its own code: pass --trust_remote_code if you trust its source"
    hints = []
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()
    if looks_local or Path(name).exists():
        hints.append("check the folder holds config.json and the weights")
    else:
        hints.append("is the id spelled right?")
        if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or "offline" in text.lower() or "connect" in text.lower():
            hints.append("offline: the model must already be in the Hugging Face cache (HF_HUB_OFFLINE is set or the hub is unreachable)")
        if "401" in text or "403" in text or "gated" in text.lower() or "private" in text.lower():
            hints.append("a private or gated model needs a token: set NLM_HF_TOKEN")
        else:
            hints.append("is the hub reachable, and does a private model have its token (NLM_HF_TOKEN)?")
    return "; ".join(hints)


MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _require_local_folder(name: str, accepted: tuple[str, ...] = MODEL_FILES) -> None:
    """A name written as a path, or naming an existing path, must be a folder holding one of `accepted`;
    otherwise say what it is instead (ModelPathError, exit 2) rather than letting the hub's error confuse."""
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith(("/", "./", "../", "~")):
            raise ModelPathError(f"model folder {name} not found (a hub id has the form owner/name, without a leading / or .)")
        return
    if not path.is_dir():
        raise ModelPathError(f"{name} is a file; expected a model folder (config.json and weights) or a hub id")
    if any((path / file).is_file() for file in accepted) or gguf_file_in(path):
        return
    if (path / "final").is_dir():
        raise ModelPathError(f"{name} is a training run folder; its model is {path / 'final'}")
    checkpoints = sorted(path.glob("checkpoint-*"))
    if checkpoints:
        raise ModelPathError(f"{name} is a training run folder without final/; pass a checkpoint such as {checkpoints[-1]}")
    if (path / "manifest.json").is_file() and any(path.glob("shard-*.safetensors")):
        raise ModelPathError(f"{name} is a teacher cache (nlm teacher-cache), not a model")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
    raise ModelPathError(f"{name} is not a model folder: it holds no {' or '.join(accepted)} (found: {found})")


def check_model_path(name: str | Path) -> None:
    """Fail early (ModelPathError, exit 2) when a local path given as a model is not a model folder."""
    _require_local_folder(str(name))


def hub_options(config: Any, revision: str | None) -> dict[str, Any]:
    """The hub keywords of this module's loaders for a model a configuration names: its revision, the
    configuration's `hf_token` and `trust_remote_code` (the one place they are read together)."""
    return {"revision": revision, "token": config.hf_token, "trust_remote_code": config.trust_remote_code}


def _hub_kwargs(revision: str | None, token: Any, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token.get_secret_value() if hasattr(token, "get_secret_value") else token
    return kwargs


def gguf_file_in(name: str | Path) -> str | None:
    """The one *.gguf file of a local folder without config.json (what `nlm export --format gguf` writes):
    transformers reads it with `gguf_file=`, dequantized. None for every other name."""
    folder = Path(name)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    files = sorted(folder.glob("*.gguf"))
    return files[0].name if len(files) == 1 else None


def _short_error(exc: Exception) -> str:
    # Hub errors span many lines; the first names the problem. Never echo request headers (tokens).
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def load_tokenizer(name: str, *, revision: str | None = None, token: Any = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `name`, with a pad token (EOS when the tokenizer defines none)."""
    from transformers import AutoTokenizer

    _require_local_folder(str(name), MODEL_FILES + TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **_hub_kwargs(revision, token, trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {_short_error(exc)} ({_hint(name, exc)})") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    revision: str | None = None,
    token: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = True,
) -> Any:
    """An `AutoModelForCausalLM` in `dtype`, moved to `device` when given."""
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(revision, token, trust_remote_code)
    gguf_file = gguf_file_in(name)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file  # GGUF holds tensors only (no code): no pickle concern
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    _require_local_folder(str(name))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the model {name!r}: {_short_error(exc)} ({_hint(name, exc)})") from None
    except ImportError as exc:  # a quantized folder whose library is missing (an int4 export: compressed-tensors)
        raise ModelLoadError(f"cannot load the model {name!r}: {_short_error(exc)}") from None
    _decompress(model, name)
    if device is not None:
        model.to(device)
    return model


def _decompress(model: Any, name: str) -> None:
    """A compressed-tensors model (an int4 export) decompressed to its dense weights now, not by the hook
    compressed-tensors runs on the first forward: code that reads the head's weight first (`sliced_head`)
    then sees the same fp32 weights as the forward does. Decided by what the folder's config declares; a
    compressed-tensors without the decompressor this calls is a ModelLoadError, never a silent skip."""
    declared = model.config.to_dict().get("quantization_config") or {}
    if declared.get("quant_method") != "compressed-tensors":
        return
    try:
        from compressed_tensors.compressors import ModelCompressor

        compressor = ModelCompressor.from_compression_config(model.config.quantization_config)
        decompress = compressor.decompress_model
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot load the model {name!r}: its config declares compressed-tensors, and this "
                             "compressed-tensors has no ModelCompressor.from_compression_config(...).decompress_model "
                             f"({_short_error(exc)}); expected compressed-tensors>=0.20,<0.21") from None
    decompress(model)


def check_model_exists(name: str, *, revision: str | None = None, token: Any = None, trust_remote_code: bool = False) -> Any:
    """Load only the config: a cheap check, before any data work, that `name` resolves."""
    from transformers import AutoConfig

    _require_local_folder(str(name))
    try:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(revision, token, trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the model {name!r}: {_short_error(exc)} ({_hint(name, exc)})") from None


def model_revision(model: Any) -> str | None:
    """The hub commit a model was loaded from, when it came from the hub."""
    return getattr(model.config, "_commit_hash", None)


def freeze(model: Any) -> Any:
    """Make a teacher inert: eval mode (no dropout) and no parameter asks for a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_trained_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    token: Any = None,
) -> Any:
    """A model nlm wrote (full weights, or a LoRA adapter over its base model), ready for inference."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model folder {path} not found")
    _require_local_folder(str(path))
    if not allow_pickle and not is_adapter_dir(path) and path.is_dir() and not any(path.glob("*.safetensors")) \
            and not gguf_file_in(path):
        raise ModelLoadError(
            f"{path} holds no *.safetensors weights; pickle weights (.bin) run code when loaded, "
            "so they are refused unless --allow_pickle"
        )
    if is_adapter_dir(path):
        import json

        from peft import PeftModel

        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ModelPathError(f"{path}/adapter_config.json names no base_model_name_or_path")
        if Path(base_name).is_absolute() and not Path(base_name).exists():
            raise ModelPathError(
                f"the LoRA adapter in {path} was trained on the base model {base_name}, which is not found; restore "
                f"that folder, or set base_model_name_or_path in {path / 'adapter_config.json'} to where it is now"
            )
        base = load_causal_lm(base_name, dtype=dtype, token=token, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        try:
            model = PeftModel.from_pretrained(base, str(path))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the LoRA adapter in {path}: {_short_error(exc)}") from None
    else:
        model = load_causal_lm(str(path), dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if device is not None:
        model.to(device)
    return model.eval()
