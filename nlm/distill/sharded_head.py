"""The output head, whole, while the fused loss uses it — under FSDP (1 and 2) and DeepSpeed ZeRO-3.

The fused loss calls the head's forward chunk by chunk *outside* the module's `__call__`, so the sharding
engines' own hooks (which gather a sharded weight around `__call__`) never run for it and it would see a
shard. `gathered_head` gathers the head's parameters once per step with each engine's own API and leaves
the gradients to the engine (reduce-scatter), instead of falling back to full logits — full [tokens, vocab]
logits are what runs large vocabularies out of memory.

- FSDP2 (`fully_shard`): `FSDPModule.unshard()` on the unit that owns the head. The unsharded parameters are
  the module's attributes until the unit reshards; the fused loss' gradients land on them and FSDP's
  end-of-backward callback reduce-scatters them into the sharded gradients. (The root unit does not reshard
  after forward anyway; a head wrapped as its own unit does, and is gathered again here.)
- FSDP1 (`FullyShardedDataParallel`): `summon_full_params` cannot be used inside a training step, so the
  trainer uses the simple loss under FSDP1 (with a warning); use FSDP2 (configs/accelerate/fsdp2.yaml).
- DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters` around the loss (read-only gather). Prepared for GPU
  machines: checked by bench/gpu_check.sh, not by the CPU test suite (DeepSpeed needs CUDA).

Also here: `prepare_teacher`, which gives a live teacher its place under each engine.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _fsdp2_owner(model: torch.nn.Module, head: torch.nn.Module) -> Any | None:
    """The innermost FSDP2 unit whose parameters include the head's weight (None without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    if isinstance(head, FSDPModule):
        return head
    owner = None
    for module in model.modules():
        if isinstance(module, FSDPModule) and any(m is head for m in module.modules()):
            owner = module  # modules() walks outer to inner: the last match is the innermost unit
    return owner


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


@contextlib.contextmanager
def gathered_head(model: torch.nn.Module, head: torch.nn.Module) -> Iterator[None]:
    """Within the block, `head`'s parameters are whole tensors whatever the sharding engine; a no-op without one."""
    params = list(head.parameters())
    if any(_is_zero3(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    owner = _fsdp2_owner(model, head)
    if owner is not None:
        owner.unshard()  # no-op when already unsharded (e.g. the root unit right after forward)
    yield


def prepare_teacher(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """The live teacher under the student's engine: DDP/FSDP keep a frozen full copy per process on the
    process's device; DeepSpeed gets a separate inference engine (ZeRO-3: its own sharded weights, no optimiser;
    stage 0 otherwise), so the teacher is never partitioned together with the student's optimiser."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return model
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        zero["stage"] = 0  # a replicated frozen model needs no partitioning
    elif getattr(getattr(model, "config", None), "hidden_size", None):  # a transformers model: its sizes
        hidden = model.config.hidden_size
        zero.update({"stage3_param_persistence_threshold": 10 * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
    for key, value in list(config.items()):
        if value == "auto":
            config.pop(key)  # batch sizes etc.: meaningless for an engine that never steps
    config["train_micro_batch_size_per_gpu"] = 1
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    logger.info("teacher: own DeepSpeed inference engine (ZeRO stage %s)", zero["stage"])
    return engine.module
