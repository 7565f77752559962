"""Which engine a run's loss goes through: decided once, when the trainer is built."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nlm.distill.engines.aligned import AlignedEngine
from nlm.distill.engines.base import EngineContext, LossEngine
from nlm.distill.engines.fused import FusedEngine
from nlm.distill.engines.simple import SimpleEngine
from nlm.distill.objective import Objective
from nlm.distill.teacher import Teacher
from nlm.errors import ConfigError

logger = logging.getLogger(__name__)

# loss_impl -> the engine for teachers whose signal is token rows of the student's own tokenisation
ROW_ENGINES = {"fused": FusedEngine, "simple": SimpleEngine}


def resolve_loss_impl(requested: str, objective: Objective, fsdp_version: Callable[[], int | None]) -> str:
    """`loss_impl` after what the run allows: the fused engine needs every row term chunkable, and FSDP2
    (`fsdp_version()`: None without FSDP)."""
    if requested == "fused" and not objective.fused_supported:
        logger.warning("the objective has a term the fused loss cannot chunk: using loss_impl=simple")
        return "simple"
    if requested == "fused" and fsdp_version() == 1:
        # FSDP1 has no unsharding API usable inside a step (FSDP2 and ZeRO-3 do: nlm.distill.sharded_head).
        logger.warning("FSDP version 1: using loss_impl=simple (the fused loss needs FSDP2; see configs/accelerate/fsdp2.yaml)")
        return "simple"
    return requested


def choose_engine(teacher: Teacher | None, objective: Objective, loss_impl: str, context: EngineContext,
                  sharded: bool = False, fsdp_version: Callable[[], int | None] = lambda: None) -> tuple[LossEngine, str]:
    """The engine for this teacher's signal (`Teacher.signal_kind`), the objective, `loss_impl` and the
    sharding; and the `loss_impl` the run ends up with (recorded in the metadata, used by evaluation)."""
    kind = teacher.signal_kind if teacher is not None else "rows"
    if kind not in ("rows", "groups"):
        raise ValueError(f"no loss engine reads a teacher signal of kind {kind!r}")
    if kind == "groups" and sharded:
        # Its distillation term recomputes head products in backward (activation checkpointing), outside
        # the engines' gather (nlm.distill.sharded_head): refused rather than trained on a shard.
        raise ConfigError("distillation.cross_tokenizer does not work with sharded parameters (FSDP, DeepSpeed "
                          "ZeRO-3) yet: use DDP (torchrun / accelerate multi-GPU) or ZeRO-1/2")
    loss_impl = resolve_loss_impl(loss_impl, objective, fsdp_version)
    plain = ROW_ENGINES[loss_impl](context)
    return (AlignedEngine(context, plain) if kind == "groups" else plain), loss_impl
