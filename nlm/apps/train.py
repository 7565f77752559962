"""`nlm train`: config -> data -> models -> trainer -> output_dir/run_name/final. One function per step."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from nlm.config.paths import claim_folder, mark_folder, path_inside, record_written, safe_output_dir
from nlm.config.settings import TrainingConfig
from nlm.data.files import resolve_eval_files
from nlm.data.mixture import source_specs
from nlm.data.prepare import PreparedData, prepare_datasets
from nlm.data.sampler import OrderPlan, OrderSampler
from nlm.data.tokenize import PaddingCollator
from nlm.distill.cross_cache import check_method as check_cross_cache_method
from nlm.distill.divergences import divergence_arguments
from nlm.distill.teacher import Teacher
from nlm.distill.teacher_loading import load_teacher, teacher_specs
from nlm.errors import ConfigError, DataError, RunExistsError
from nlm.models.device import PrecisionPlan, resolve_precision, select_device
from nlm.models.heads import head_reproduces_logits
from nlm.models.loading import (
    check_model_exists,
    count_parameters,
    hub_options,
    load_causal_lm,
    load_tokenizer,
    model_revision,
)
from nlm.models.lora import apply_lora
from nlm.training.arguments import training_arguments
from nlm.training.callbacks import add_hardware_metrics, install_callbacks
from nlm.training.fingerprint import FINGERPRINT_FILE, record_fingerprint
from nlm.training.metadata import redacted_config, write_metadata
from nlm.training.objective_setup import (
    attach_objective,
    build_objective,
    describe_objective,
    detach_objective,
    save_projections,
)
from nlm.training.order import build_order, global_batch, model_scorer
from nlm.training.policy import StepPolicy
from nlm.training.quantization_aware import prepare_student, strip_fake_quantizers
from nlm.training.tracker_output import direct_tracker_output, prepare_trackers
from nlm.training.trainer import DistillationTrainer

logger = logging.getLogger(__name__)

from nlm.models.model_info import METADATA_FILE  # noqa: E402  (one owner of the file name)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# What nlm train writes directly inside a run folder (the Trainer's checkpoints and logs, our final/):
# `--overwrite` removes only these; anything else a user put there is kept.
RUN_FOLDER_ENTRIES = ("checkpoint-*", "tmp-checkpoint-*", "final", "runs", "*.partial", FINGERPRINT_FILE)


def prepare_run_dir(config: TrainingConfig) -> tuple[Path, str | None]:
    """The run folder, created and marked as nlm's; and the checkpoint to resume from.

    Never overwrites without being asked, and with --overwrite removes only what an earlier nlm run wrote.
    """
    output_dir = safe_output_dir(config.output_dir)
    run_dir = path_inside(output_dir, config.run_name)
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and config.resume:
        checkpoint = get_last_checkpoint(str(run_dir))
        if checkpoint is None:
            raise RunExistsError(f"--resume: {run_dir} holds no checkpoint-N folder to resume from")
        logger.info("resuming from %s", checkpoint)
        return run_dir, checkpoint
    if config.resume:
        raise RunExistsError(f"--resume: {run_dir} does not exist or is empty; there is nothing to resume")
    if existing:
        finished = (run_dir / "final" / METADATA_FILE).exists()
        state = "a finished run" if finished else "an unfinished run"
        claim_folder(run_dir, created_by="nlm train", owns=RUN_FOLDER_ENTRIES, overwrite=config.overwrite,
                     exists_message=f"{run_dir} already holds {state}; pass --resume to continue it, --overwrite to "
                                    "replace it, or choose another --run_name")
    return mark_folder(run_dir, "nlm train", RUN_FOLDER_ENTRIES), None


def _check_required(config: TrainingConfig) -> None:
    if config.eval_strategy != "no" and not (config.eval_file or config.eval_split > 0 or resolve_eval_files(None)):
        raise ConfigError(f"eval_strategy={config.eval_strategy} needs evaluation data: set eval_file or eval_split")
    if not config.student_model:
        raise ConfigError("student_model is required: pass --student_model ID_OR_FOLDER or set it in the config file")
    if config.teacher_cache:
        check_cross_cache_method(config.distillation.cross_tokenizer)
    try:  # divergence_options are declared by the divergence itself (nlm.distill.divergences)
        divergence_arguments(config.distillation.divergence, config.distillation.model_dump())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.distillation.seq_kd and not config.teacher_model:
        served = " (a served teacher, teacher_url, scores text but does not write it)" if config.teacher_url else ""
        raise ConfigError(f"distillation.seq_kd needs a teacher that generates: pass --teacher_model{served}")
    if config.distillation.lmbda > 0 and not (config.teacher_model or config.teacher_url):
        raise ConfigError("distillation.lmbda > 0 needs a live teacher to score the student's samples: pass "
                          "--teacher_model or --teacher_url")
    if config.distillation.lmbda > 0 and config.distillation.alpha == 0:
        raise ConfigError("distillation.lmbda > 0 trains on the teacher's scores of the student's samples: "
                          "set distillation.alpha > 0")
    if (not config.teacher_model and not config.teachers and not config.teacher_cache and not config.teacher_url
            and config.distillation.alpha > 0):
        raise ConfigError(
            "teacher_model is required when distillation.alpha > 0: pass --teacher_model (or --teacher_cache DIR), "
            "or --distillation.alpha 0 for plain fine-tuning"
        )
    # A missing, unreadable or directory data file is a usage error named by its option (exit 2), before models;
    # with a train_mixture every source is resolved (train_file is then unset).
    source_specs(config)
    resolve_eval_files(config.eval_file)


@dataclass
class RunStart:
    """What the run was started with: device, precision, Trainer arguments, its folder and checkpoint."""

    device: torch.device
    precision: PrecisionPlan
    args: Any  # TrainingArguments
    run_dir: Path
    checkpoint: str | None
    resumed_changes: dict[str, Any]


@dataclass
class RunParts:
    """The models, data and objective one run trains with."""

    tokenizer: Any
    student: Any
    teacher: Teacher | None
    vocab_width: int
    data: PreparedData
    plan: OrderPlan | None
    loss_impl: str
    objective: Any
    parameters: dict[str, int]


def train(config: TrainingConfig, log_format: str = "text") -> TrainResult:
    """Distil `teacher_model` into `student_model` on the configured data; returns where the model went."""
    started = time.perf_counter()
    start = start_run(config, log_format)
    parts = load_run_parts(config, start)
    trainer = build_trainer(config, start, parts)
    output = train_saving_on_teacher_loss(trainer, start.checkpoint)
    if parts.teacher is not None:  # a served teacher's connections and request threads
        parts.teacher.close()
    metrics = dict(output.metrics)
    if parts.data.eval is not None:
        metrics.update(_final_eval(trainer))
    return finish_run(config, start, parts, trainer, metrics, started)


def start_run(config: TrainingConfig, log_format: str) -> RunStart:
    """Checks that need no model (required fields, that the models exist), the device, the run folder."""
    _check_required(config)
    if config.teacher_url:  # a teacher server that does not answer fails here, before any model loads (exit 2)
        from nlm.distill.served_teacher import probe_server

        probe_server(config)[0].close()
    # Fail on a missing model before any data work or folder creation.
    check_model_exists(config.student_model, **hub_options(config, config.student_revision))
    if not config.teacher_cache:
        for spec in teacher_specs(config):
            check_model_exists(spec.model, **hub_options(config, spec.revision))
    device = select_device(config.device_preference, config.device)
    precision = resolve_precision(config.precision, device)
    logger.info("precision: %s on %s", precision.name, device)
    run_dir = path_inside(safe_output_dir(config.output_dir), config.run_name)
    args = training_arguments(config, run_dir, device.type, precision, log_format)
    # Under torchrun/accelerate every process runs this; only the main one checks, clears and marks the run
    # folder (the others would see its marker as an earlier run), then the others find its checkpoint.
    with args.main_process_first(local=False, desc="run folder"):
        resumed_changes: dict[str, Any] = {}
        if args.process_index == 0:
            run_dir, checkpoint = prepare_run_dir(config)
            # Resuming other data or models is refused here, before any model loads; changed settings are kept.
            resumed_changes = record_fingerprint(config, run_dir, resuming=checkpoint is not None)
        else:
            checkpoint = get_last_checkpoint(str(run_dir)) if config.resume else None
    prepare_trackers(config.report_to, config.output_dir, run_dir)
    return RunStart(device, precision, args, run_dir, checkpoint, resumed_changes)


def load_run_parts(config: TrainingConfig, start: RunStart) -> RunParts:
    """Tokenizer, student (+ LoRA, QAD), teacher, data and its order, the loss engine's impl and the objective."""
    args = start.args
    tokenizer = load_tokenizer(config.student_model, **hub_options(config, config.student_revision))
    set_seed(config.seed)  # weights a checkpoint lacks are initialised randomly: same seed, same weights
    student, teacher, vocab_width = load_models(config, tokenizer, start.device, start.precision)
    student = prepare_student(student, config.quantization_aware)  # issue 25: scheme none -> unchanged
    with args.main_process_first(local=False, desc="tokenisation"):
        data = prepare_datasets(config, tokenizer, cache_root=path_inside(config.output_dir, ".cache/tokenized"),
                                with_index=teacher is not None and "index" in teacher.batch_columns,
                                teacher_tokenizer=teacher.paired_tokenizer if teacher is not None else None)
    teacher_models = teacher.models() if teacher is not None else []
    plan = build_order(config, data, args.world_size, model_scorer(
        {"student": student, "teacher": teacher_models[0] if len(teacher_models) == 1 else None},
        {"student": config.student_model, "teacher": config.teacher_model}, vocab_width,
        tokenizer.pad_token_id or 0, config.per_device_eval_batch_size, path_inside(config.output_dir, ".cache/tokenized")))
    loss_impl = choose_loss_impl(config.loss_impl, student, teacher, data.train[0]["input_ids"],
                                 data.train[0].get("teacher_input_ids"))
    objective = build_objective(config, student, teacher)
    check_routes(config, data, plan)
    if config.lora.enabled:
        set_seed(config.seed)  # LoRA's A matrices are random: seeded here, since the Trainer seeds only later
        student = apply_lora(student, config.lora)
        if config.gradient_checkpointing:
            student.enable_input_require_grads()
    attach_objective(student, objective)  # learnable parts (projections, temperature) train with the student
    trainable, total = count_parameters(student)
    logger.info("student: %d parameters, %d trainable (%.2f%%)", total, trainable, 100 * trainable / max(total, 1))
    return RunParts(tokenizer, student, teacher, vocab_width, data, plan, loss_impl, objective,
                    {"total": total, "trainable": trainable})


def build_trainer(config: TrainingConfig, start: RunStart, parts: RunParts) -> DistillationTrainer:
    """The DistillationTrainer over the run's parts, with nlm's callbacks and tracker places."""
    tokenizer, teacher, plan = parts.tokenizer, parts.teacher, parts.plan
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = DistillationTrainer(
        model=parts.student,
        args=start.args,
        train_dataset=parts.data.train,
        eval_dataset=parts.data.eval,
        data_collator=PaddingCollator(pad_id, teacher_pad_token_id=_pad_id(teacher.paired_tokenizer if teacher is not None else None)),
        processing_class=tokenizer,
        teacher=teacher,
        distillation=config.distillation,
        objective=parts.objective,
        vocab_width=parts.vocab_width,
        max_bad_steps=config.max_bad_steps,
        loss_impl=parts.loss_impl,
        chunk_tokens=config.loss_chunk_tokens,
        step_policy=StepPolicy.from_config(config.distillation, seed=config.seed, pad_id=pad_id, tokenizer=tokenizer,
                                           teacher=teacher),
        train_sampler=OrderSampler(plan) if plan is not None else None,
        source_names=list(plan.names) if plan is not None and config.log_per_source else None,
    )
    install_callbacks(trainer)
    direct_tracker_output(trainer, start.run_dir)
    add_hardware_metrics(trainer)
    return trainer


def finish_run(config: TrainingConfig, start: RunStart, parts: RunParts, trainer: DistillationTrainer,
               metrics: dict[str, Any], started: float) -> TrainResult:
    """final/: the plain student (objective parts and fake quantizers taken off), its projections, the metadata."""
    run_dir, teacher = start.run_dir, parts.teacher
    detach_objective(trainer.model)
    if config.quantization_aware.enabled:
        strip_fake_quantizers(trainer.model)  # final/ holds plain weights; the scheme is in the metadata
    final_path = run_dir / "final"
    kept_in_final = [entry.name for entry in final_path.iterdir()] if final_path.is_dir() else []  # a user's
    final_dir = save_final(trainer, parts.tokenizer, run_dir, config)
    if trainer.is_world_process_zero():
        save_projections(parts.objective, final_dir)
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()  # leave with rank 0, once it has written the metadata (below)
        return TrainResult(run_dir=run_dir, final_dir=final_dir, metrics=metrics, seconds=seconds)
    write_metadata(
        final_dir / METADATA_FILE,
        config=redacted_config(config),
        teacher={"model": config.teacher_model, "teacher_cache": str(config.teacher_cache) if config.teacher_cache else None,
                 "revision": model_revision(teacher.live_model) if teacher is not None and teacher.live_model is not None else None,
                 **(teacher.describe() if teacher is not None else {}),
                 "describe": teacher.describe() if teacher is not None else None},
        loss_impl=trainer.loss_impl,
        objective=describe_objective(parts.objective, config),
        student={"model": config.student_model, "revision": model_revision(trainer.model)},
        data=data_summary(parts.data, parts.plan, trainer.state.global_step * global_batch(config, start.args.world_size)),
        device=str(start.device),
        teacher_device=str(teacher.device) if teacher is not None and teacher.device is not None else None,
        precision=start.precision.name,
        world_size=start.args.world_size,
        parameters=parts.parameters,
        wall_seconds=round(seconds, 3),
        global_step=trainer.state.global_step,
        final_metrics=metrics,
        best_metric=trainer.state.best_metric,
        best_checkpoint=trainer.state.best_model_checkpoint,
        log_history=trainer.state.log_history,
        resumed={"checkpoint": start.checkpoint, "changed_settings": start.resumed_changes} if start.checkpoint else None,
    )
    record_written(final_dir, "nlm train", kept_in_final)  # --overwrite removes exactly what this run wrote there
    logger.info("final model written to %s (%.1fs)", final_dir, seconds)
    # Every rank leaves together: a worker that exited while rank 0 still wrote was seen to abort at shutdown
    # under load ("terminate called without an active exception"), failing a run that had succeeded.
    trainer.accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, final_dir=final_dir, metrics=metrics, seconds=seconds)


def train_saving_on_teacher_loss(trainer: DistillationTrainer, checkpoint: str | None) -> Any:
    """trainer.train(); when a served teacher stays unreachable, a checkpoint of the last finished step is
    written first (`--resume` continues from it to the same final weights)."""
    from nlm.distill.served_teacher import TeacherUnavailableError

    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except TeacherUnavailableError:
        trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own format: optimizer, scheduler, RNG
        logger.info("checkpoint of step %d saved before stopping", trainer.state.global_step)
        if trainer.teacher is not None:
            trainer.teacher.close()
        raise


def load_models(config: TrainingConfig, tokenizer: Any, device: torch.device, precision: PrecisionPlan
                ) -> tuple[Any, Teacher | None, int]:
    """The student (fp32 master weights; mixed precision autocasts), the teacher (nlm.distill.teacher_loading),
    and the vocabulary width both are compared over."""
    student = load_causal_lm(config.student_model, dtype=torch.float32, **hub_options(config, config.student_revision))
    teacher = load_teacher(config, tokenizer, student, device, precision)
    # A teacher with its own tokenizer compares aligned groups: the width is the student's own.
    own = teacher is None or teacher.paired_tokenizer is not None
    return student, teacher, len(tokenizer) if own else teacher.vocab_width


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0


def check_routes(config: TrainingConfig, data: PreparedData, plan: OrderPlan | None) -> None:
    """With teacher_mixture=route, every example must name its teacher or come from a source named like one."""
    if not config.route_teachers:
        return
    unnamed = sum(1 for index in data.train["teacher"] if index < 0)
    sources = set(plan.names) if plan is not None else set()
    if unnamed and (plan is None or not sources <= set(config.route_teachers)):
        raise DataError(f"distillation.teacher_mixture=route: {unnamed} training records have no 'teacher' field and no "
                        f"train_mixture source named after a teacher ({', '.join(config.route_teachers)})")


def choose_loss_impl(requested: str, student: Any, teacher: Any, sample_ids: list[int],
                     teacher_sample_ids: list[int] | None = None) -> str:
    """The fused loss needs logits == head(hidden); models that soft-cap or scale logits use the simple path.

    A teacher with its own tokenizer (cross-tokenizer) is checked on its own token ids."""
    if requested != "fused":
        return requested
    # A few tokens: the check runs before the student reaches its device.
    ids = torch.tensor([sample_ids[:8]])
    teacher_ids = torch.tensor([teacher_sample_ids[:8]]) if teacher_sample_ids else ids
    checks = [("student", student, ids)] + ([("teacher", model, teacher_ids) for model in teacher.models()]
                                            if teacher is not None else [])
    for role, model, sample in checks:
        if not head_reproduces_logits(model, sample.to(next(model.parameters()).device)):
            logger.warning("the %s post-processes its logits (e.g. soft-capping): using loss_impl=simple", role)
            return "simple"
    return "fused"


def _final_eval(trainer: DistillationTrainer) -> dict[str, Any]:
    """The last eval's figures when it ran at the final step, else a fresh evaluation."""
    last = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if last and last[-1].get("step") == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        return {k: v for k, v in last[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


def data_summary(data: PreparedData, plan: OrderPlan | None = None, draws: int = 0) -> dict[str, Any]:
    summary = data.summary()
    if plan is not None:  # each source's hash and weight are in summary["sources"]; add what was drawn
        drawn = plan.drawn_counts(draws)
        for source in summary["sources"]:
            source["drawn"] = drawn[source["name"]]
        summary["order"] = {"epoch_length": plan.epoch_length(), "stopping": plan.stopping, "size": plan.size,
                            "seed": plan.seed, "curriculum": plan.ranking is not None}
    return json.loads(json.dumps(summary, default=str))


def save_final(trainer: DistillationTrainer, tokenizer: Any, run_dir: Path, config: TrainingConfig) -> Path:
    """final/: weights (full model or LoRA adapter) as safetensors, tokenizer, generation config; merged on request."""
    final_dir = path_inside(run_dir, "final")
    trainer.save_model(str(final_dir))  # every process must call it (it gathers sharded weights); rank 0 writes
    if not trainer.is_world_process_zero():
        return final_dir
    (final_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the metadata holds the config
    tokenizer.save_pretrained(str(final_dir))
    model = trainer.model
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(final_dir))
    if config.lora.enabled and config.merge_lora and hasattr(model, "merge_and_unload"):
        merged_dir = path_inside(final_dir, "merged")
        merged = model.merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
        logger.info("merged LoRA model written to %s", merged_dir)
    return final_dir
