"""`transformers.Trainer` with the distillation loss. Only the loss and the logged figures change; the loop,
accumulation, mixed precision, checkpointing and distribution are the library's."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
from transformers import Trainer

from nlm.config.settings import DistillationConfig
from nlm.distill.engines.base import EngineContext, target_rows
from nlm.distill.engines.choose import choose_engine
from nlm.distill.loss import LossParts
from nlm.distill.metrics import EvalSums, score_batch
from nlm.distill.objective import Objective, objective_from_config
from nlm.distill.sharded_head import gathered_head, prepare_teacher
from nlm.distill.teacher import Teacher
from nlm.errors import TrainingDivergedError
from nlm.models.heads import output_head
from nlm.training.policy import StepPolicy
from nlm.training.term_balance import warn_unbalanced_terms

logger = logging.getLogger(__name__)


class DistillationTrainer(Trainer):
    """Trains the student on an objective (default (1-α)·CE + α·τ²·D(teacher ‖ student)) with targets from any
    `Teacher`; evaluates CE, perplexity and teacher agreement."""

    def __init__(
        self,
        *args: Any,
        teacher: Teacher | None,
        distillation: DistillationConfig,
        objective: Objective | None = None,
        vocab_width: int,
        max_bad_steps: int = 3,
        loss_impl: str = "fused",
        chunk_tokens: int | None = None,
        step_policy: StepPolicy | None = None,
        train_sampler: Any | None = None,
        source_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # The data order (mixture / curriculum, nlm.data.sampler) replaces the library's shuffling; with
        # `source_names` the task loss of each source is logged too (nlm.training.per_source).
        self.train_sampler = train_sampler
        self.source_names = source_names
        self.objective = objective if objective is not None else objective_from_config(distillation)
        self._base_objective = self.objective
        if teacher is None and "teacher" in self.objective.needs:
            raise ValueError("a teacher is required when distillation.alpha > 0")
        self.teacher = teacher
        self._ahead_source: Any = None  # the epoch iterator `_ahead` wraps
        self._ahead: Any = None
        self.distillation = distillation
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and getattr(plugin, "zero_stage", 0) == 3)
        # The loss engine, chosen once from the teacher's declared signal (nlm.distill.engines).
        self.engine, self.loss_impl = choose_engine(
            teacher, self.objective, loss_impl,
            EngineContext(vocab_width, chunk_tokens, self.accelerator.unwrap_model, self.accelerator.autocast,
                          self._gathered_teacher_head),
            sharded=sharded, fsdp_version=lambda: (getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
                                                   if self.is_fsdp_enabled else None))
        if teacher is not None:
            teacher.wrap_models(lambda model: prepare_teacher(model, self.accelerator))  # DeepSpeed: its own engine
        self.chunk_tokens = chunk_tokens
        self.step_policy = step_policy  # None: every step trains on the dataset (see nlm/training/policy.py)
        self.vocab_width = vocab_width
        self.max_bad_steps = max_bad_steps
        self._bad_steps = 0
        self._eval_sums: EvalSums | None = None
        self._window = self._new_window()
        # The loss is normalised by the target-token count of the whole accumulated step (num_items_in_batch),
        # so the Trainer must count tokens after the causal shift and must not divide by the accumulation again.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    @staticmethod
    def _new_window() -> dict[str, float]:
        """Sums since the last logged step (means and rates are taken over them)."""
        return {"task": 0.0, "distill": 0.0, "targets": 0, "batches": 0, "samples": 0, "tokens": 0,
                "start": time.perf_counter(), "source_ce": None, "source_tokens": None}

    def _get_train_sampler(self, train_dataset: Any | None = None) -> Any:
        if self.train_sampler is not None and (train_dataset is None or train_dataset is self.train_dataset):
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The micro-batches of one optimiser step; the step policy may replace their completions (once per step,
        before the target tokens that normalise the loss are counted)."""
        batches, num_items = super().get_batch_samples(self._read_ahead(epoch_iterator), num_batches, device)
        if self.step_policy is None or not batches:
            return batches, num_items
        student = self.accelerator.unwrap_model(self.model)
        batches, source = self.step_policy.prepare(batches, self.state.global_step, student, self.args.process_index)
        # The policy may override α for this step (on-policy steps are pure divergence): same terms, new weights.
        alpha = self.step_policy.alpha(source)
        self.objective = self._base_objective if alpha is None else self._base_objective.with_alpha(alpha)
        return batches, self._get_num_items_in_batch(batches, device)

    def _read_ahead(self, epoch_iterator: Any) -> Any:
        """The teacher may start work on the next micro-batches while this one computes (a served teacher's
        requests); the wrapper is kept per epoch iterator, since HF calls this once per accumulation window."""
        if self.teacher is None:
            return epoch_iterator
        if self._ahead_source is not epoch_iterator:
            self._ahead_source, self._ahead = epoch_iterator, self.teacher.read_ahead(epoch_iterator)
        return self._ahead

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not model.training:
            return self._eval_loss(model, inputs, return_outputs)
        normalizer = num_items_in_batch
        if normalizer is not None and torch.is_tensor(normalizer):
            normalizer = normalizer.to(inputs["labels"].device)
        step = self.engine.step(model, inputs, self.objective, self.teacher, normalizer)
        parts, outputs = step.parts, step.outputs
        loss = parts.total
        if self.args.average_tokens_across_devices and normalizer is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # gradients are averaged over processes afterwards
        loss = self._guard_finite(loss, model)
        self._record(parts, normalizer, inputs)
        if self.source_names and "source" in inputs:
            mask, targets = target_rows(inputs)
            self._record_sources(step.logits, targets, inputs["source"].unsqueeze(1).expand_as(mask)[mask])
        return (loss, outputs) if return_outputs else loss

    def _gathered_teacher_head(self) -> Any:
        """A live teacher sharded by DeepSpeed ZeRO-3 needs its head whole for the chunk loop too."""
        stack = contextlib.ExitStack()
        for teacher_model in self.teacher.models() if self.teacher is not None else []:
            stack.enter_context(gathered_head(teacher_model, output_head(teacher_model)))
        return stack

    @torch.no_grad()
    def _eval_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool) -> Any:
        """Eval: token-level CE for the Trainer, plus KL and agreement sums against a live teacher.

        With the fused loss, evaluation is chunked too: only [chunk, V] logits of the target rows exist.
        """
        assert self._eval_sums is not None
        before = (self._eval_sums.ce, self._eval_sums.tokens)
        outputs = score_batch(
            self._eval_sums, model, inputs, self.vocab_width,
            teacher=self.teacher if self.teacher is not None and self.teacher.full_distribution else None,
            chunked=self.loss_impl == "fused", chunk_tokens=self.chunk_tokens,
            model_for_head=self.accelerator.unwrap_model(model),
            # Every process's per-example sums (repeats that even out the last batch dropped): the figures
            # and the best-model choice cover the whole eval set, not one process's shard.
            gather=self.accelerator.gather_for_metrics, autocast=self.accelerator.autocast,
        )
        ce, count = self._eval_sums.ce - before[0], self._eval_sums.tokens - before[1]
        task = torch.tensor(ce / max(count, 1), device=inputs["input_ids"].device)
        return (task, outputs) if return_outputs else task

    def _guard_finite(self, loss: torch.Tensor, model: Any) -> torch.Tensor:
        """Skip the update of a NaN/inf micro-batch; stop after `max_bad_steps` in a row.

        Under DDP every process takes the same decision (one non-finite loss anywhere skips the micro-batch
        everywhere), and the zero loss that replaces it stays connected to every trainable parameter, so
        each process's backward runs the same gradient all-reduce and none waits for the others forever.
        """
        bad = not bool(torch.isfinite(loss).item())
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if bad else 0.0], device=loss.device)
            bad = bool(self.accelerator.gather(flag).max().item())
        if not bad:
            self._bad_steps = 0
            return loss
        self._bad_steps += 1
        logger.warning("non-finite loss at step %d (%d in a row); this batch is skipped", self.state.global_step, self._bad_steps)
        if self._bad_steps >= self.max_bad_steps:
            raise TrainingDivergedError(
                f"loss was NaN/inf for {self._bad_steps} batches in a row at step {self.state.global_step}; "
                "stopped, keeping the last saved checkpoint. Lower learning_rate, use fp32/bf16 instead of fp16, "
                "or check the data"
            )
        # Zero through the parameters, not through the NaN activations (0·NaN is NaN): every trainable
        # parameter gets an exact zero gradient, so this micro-batch adds nothing.
        trainable = [p for p in model.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].sum() for p in trainable), loss.new_zeros(())) * 0.0

    def _record(self, parts: LossParts, normalizer: Any, inputs: dict[str, torch.Tensor]) -> None:
        # Parts are normalised per optimiser step; back to sums over this micro-batch's target tokens, so the
        # logged figures are per-token means over the window and over every process (see `log`).
        scale = float(normalizer) if normalizer is not None else float(max(parts.tokens, 1))
        if not getattr(self, "_balance_checked", False):  # once, on the first batch (issue 24)
            self._balance_checked = True
            warn_unbalanced_terms(self.objective, parts)
        self._window["task"] += parts.task.item() * scale
        self._window["distill"] += parts.distill.item() * scale
        for name, value in parts.terms.items():
            if name not in ("ce", "kd"):
                self._window[f"{name}_loss"] = self._window.get(f"{name}_loss", 0.0) + value.item() * scale
        self._window["targets"] += parts.tokens
        self._window["batches"] += 1
        self._window["samples"] += int(inputs["input_ids"].shape[0])
        mask = inputs.get("attention_mask")
        self._window["tokens"] += int(mask.sum().item()) if mask is not None else inputs["input_ids"].numel()

    def _record_sources(self, logits: Any, targets: torch.Tensor, token_source: torch.Tensor) -> None:
        from nlm.training.per_source import per_source_sums

        sums, counts = per_source_sums(logits, targets, token_source.to(targets.device), len(self.source_names or []),
                                       chunk=self.chunk_tokens or 1024)
        if self._window["source_ce"] is None:
            self._window["source_ce"], self._window["source_tokens"] = sums, counts
        else:
            self._window["source_ce"] += sums
            self._window["source_tokens"] += counts

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window["source_ce"] is not None:
            sums, counts = self._window["source_ce"], self._window["source_tokens"]
            if self.accelerator.num_processes > 1:
                sums, counts = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(counts, "sum")
            for name, ce, n in zip(self.source_names or [], sums.tolist(), counts.tolist(), strict=True):
                if n:
                    logs[f"task_loss/{name}"] = round(ce / n, 6)
        if "loss" in logs and self._window["batches"]:
            elapsed = max(time.perf_counter() - self._window["start"], 1e-9)
            terms = ["task", "distill", *sorted(k for k in self._window if k.endswith("_loss")), "targets"]
            sums = [float(self._window[key]) for key in terms]
            if self.accelerator.num_processes > 1:  # every process's tokens: the same figures as one process
                device = self.accelerator.device
                sums = self.accelerator.reduce(torch.tensor(sums, dtype=torch.float64, device=device), "sum").tolist()
            totals = dict(zip(terms, sums, strict=True))
            targets = max(totals.pop("targets"), 1.0)
            logs["task_loss"] = round(totals.pop("task") / targets, 6)
            logs["distill_loss"] = round(totals.pop("distill") / targets, 6)
            processes = max(self.accelerator.num_processes, 1)
            logs["tokens_per_second"] = round(self._window["tokens"] * processes / elapsed, 2)
            logs["samples_per_second"] = round(self._window["samples"] * processes / elapsed, 2)
            logs.update({key: round(value, 6) for key, value in self.objective.pop_stats().items()})
            for key, total in totals.items():
                logs[key] = round(total / targets, 6)
            if self.step_policy is not None:
                logs.update(self.step_policy.figures(elapsed))
            self._window = self._new_window()
        super().log(logs, start_time)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """Run the library's loop, then replace its batch-averaged loss with token-level figures."""
        self._eval_sums = EvalSums()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        figures = self._eval_sums.metrics()
        if self._eval_sums.tokens:
            output.metrics[f"{prefix}_loss"] = figures["loss"]
            output.metrics[f"{prefix}_perplexity"] = figures["perplexity"] if math.isfinite(figures["perplexity"]) else float("inf")
            output.metrics[f"{prefix}_token_accuracy"] = figures["token_accuracy"]
            for key in ("teacher_kl", "teacher_agreement"):
                if key in figures:
                    output.metrics[f"{prefix}_{key}"] = figures[key]
        self._eval_sums = None
        return output
