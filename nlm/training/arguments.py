"""TrainingConfig -> transformers.TrainingArguments: one place maps our options to the library's."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from nlm.config.settings import TrainingConfig
from nlm.models.device import PrecisionPlan

logger = logging.getLogger(__name__)


def _checkpointing_arguments(enabled: bool) -> dict:
    """transformers >= 5.20 names it activation_checkpointing; the 5.x vLLM pins (< 5.20) gradient_checkpointing."""
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(
    config: TrainingConfig, run_dir: Path, device_type: str, precision: PrecisionPlan, log_format: str = "text"
) -> TrainingArguments:
    eval_steps = config.eval_steps or config.logging_steps
    save_strategy, save_steps = config.save_strategy, config.save_steps
    if config.load_best_model_at_end:
        # The library needs checkpoints on the evaluation schedule to pick the best one.
        save_strategy, save_steps = config.eval_strategy, eval_steps
    args = TrainingArguments(
        output_dir=str(run_dir),
        run_name=config.run_name,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        auto_find_batch_size=config.auto_find_batch_size,
        **_checkpointing_arguments(config.gradient_checkpointing),
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=device_type == "cpu",
        eval_strategy=config.eval_strategy,
        eval_steps=eval_steps if config.eval_strategy == "steps" else None,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=config.load_best_model_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        report_to=config.report_to or "none",
        label_names=["labels"],
        prediction_loss_only=True,
        remove_unused_columns=False,
        # A bar on interactive terminals; JSON-lines logs and pipes get one log line per logging step instead.
        disable_tqdm=log_format == "json" or not sys.stderr.isatty(),
        dataloader_pin_memory=device_type == "cuda",
    )
    return one_device_without_launcher(args)


def one_device_without_launcher(args: TrainingArguments) -> TrainingArguments:
    """Several visible GPUs and no launcher: train on one, never under `nn.DataParallel`.

    The Trainer would wrap the model in DataParallel, whose replicas break the fused loss (it reaches the
    head outside the replicated forward) and which PyTorch itself advises against; DDP needs a launcher.
    """
    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED and args.n_gpu > 1:
        logger.warning(
            "%d GPUs are visible but nlm was started without a launcher: training on one (%s). To use all of them, "
            "run `torchrun --nproc_per_node %d -m nlm.cli train ...` or `accelerate launch -m nlm.cli train ...`",
            args.n_gpu, args.device, args.n_gpu,
        )
        args._n_gpu = 1  # the library's own switch for "one device per process" (it is what DataParallel reads)
    return args
