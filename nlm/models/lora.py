"""LoRA through PEFT, with target modules found by looking at the model rather than by model name."""

from __future__ import annotations

import logging
import re

from torch import nn

from nlm.config.settings import LoRAConfig
from nlm.errors import ConfigError
from nlm.models.loading import count_parameters

logger = logging.getLogger(__name__)

# A module inside a repeated block has a numeric path component: model.layers.3.self_attn.q_proj.
_IN_BLOCK = re.compile(r"\.\d+\.")


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style layers store a transposed Linear

    return isinstance(module, (nn.Linear, Conv1D))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_lora_targets(model: nn.Module, include_lm_head: bool = False) -> list[str]:
    """Leaf names of every Linear/Conv1D inside the transformer blocks (attention and MLP projections).

    Output head and embeddings are left out unless `include_lm_head`; so are projections outside the
    repeated blocks (a model's own top-level adapters), which LoRA seldom helps.
    """
    heads = _head_names(model)
    targets = {
        _leaf(name)
        for name, module in model.named_modules()
        if _is_projection(module) and _IN_BLOCK.search(f".{name}.") and name not in heads
    }
    if include_lm_head:
        targets |= {_leaf(name) for name in heads}
    return sorted(targets)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Leaf names PEFT can put an adapter on: Linear, Conv1D and Embedding modules."""
    return sorted(
        {_leaf(name) for name, module in model.named_modules() if name and (_is_projection(module) or isinstance(module, nn.Embedding))}
    )


def resolve_lora_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The user's list checked against the model, or the auto-detected list."""
    if config.target_modules == "auto":
        return find_lora_targets(model, include_lm_head=config.include_lm_head)
    valid = adaptable_module_names(model)
    unknown = [name for name in config.target_modules if name not in valid]
    if unknown:
        raise ConfigError(
            f"lora.target_modules: {', '.join(unknown)} not found in the student; valid names: {', '.join(valid)}"
        )
    return list(config.target_modules)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters, or return it unchanged (full fine-tuning) when no target exists."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = resolve_lora_targets(model, config)
    if not targets:
        if config.required:
            raise ConfigError("lora.required is true but no Linear/Conv1D projection was found in the student")
        logger.warning("LoRA: no target module found in the student; training every weight instead (full fine-tuning)")
        return model
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_config)
    trainable, total = count_parameters(wrapped)
    logger.info("LoRA on %s: %d of %d parameters trainable (%.2f%%)", ", ".join(targets), trainable, total, 100 * trainable / total)
    return wrapped
