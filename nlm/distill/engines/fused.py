"""The fused, chunked loss: from final hidden states and output heads, never materialising full logits.

Written by hand because no library computes every divergence of this engine chunk-wise with a generic
(LoRA-wrapped, tied, biased) output head. It follows the fused-linear-cross-entropy idea: the forward
walks over chunks of target tokens; per chunk it computes the student's logits [c, V] (and the teacher's,
on the teacher's device), the loss, and — while that chunk's logits are alive — the gradients with respect
to the chunk's hidden states and the head's trainable parameters. Only those gradients ([n, H] and the
head's size) outlive the chunk; backward just scales them by the incoming gradient. Peak extra memory is
one chunk of logits instead of [n, V] for each model, and there is no recomputation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from nlm.distill.engines.base import (
    EngineContext,
    EngineStep,
    linear_parts,
    student_forward,
    target_rows,
    with_batch_terms,
)
from nlm.distill.engines.chunks import chunk_rows, spans
from nlm.distill.loss import LossParts, LossSettings, combine_terms, objective_from_settings
from nlm.distill.objective import Objective
from nlm.distill.sharded_head import gathered_head
from nlm.distill.targets import SparseTargets, TeacherRows
from nlm.distill.teacher import Teacher
from nlm.distill.terms import Scratch
from nlm.models.heads import capture_hidden, output_head

Autocast = Callable[[], AbstractContextManager]


def _no_autocast() -> AbstractContextManager:
    return contextlib.nullcontext()


class _FusedLoss(torch.autograd.Function):
    """Inputs: hidden [n, H], the spec, then the head's trainable parameters and the objective's own
    (e.g. a learned temperature). Outputs: the total and one detached sum per row term."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, spec: dict, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        head: Callable[[torch.Tensor], torch.Tensor] = spec["head"]
        teacher_rows: TeacherRows = spec["teacher_rows"]
        targets: torch.Tensor = spec["targets"]
        objective: Objective = spec["objective"]
        width, rows = spec["width"], spec["rows"]
        weights = spec["weights"]  # d total / d (each row term's sum)
        needs_grad = spec["needs_grad"]
        head_count = spec["head_count"]  # params[:head_count] belong to the head, the rest to the objective
        n = hidden.shape[0]
        totals = [hidden.new_zeros((), dtype=torch.float32) for _ in weights]
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        linear = spec["linear"]
        # A plain linear head's weight gradient is written by the first chunk's product (no head-sized fill).
        grad_params = [torch.empty_like(p) if linear is not None and p is linear[0] else torch.zeros_like(p)
                       for p in params] if needs_grad else []
        for start, end in spans(n, rows):
            if linear is not None:
                sums = _linear_chunk(hidden[start:end], linear, params, head_count, grad_hidden, grad_params,
                                     start, end, teacher_rows, targets, objective, width, weights, needs_grad,
                                     spec["autocast"], spec["scratch"])
            else:
                chunk = hidden[start:end].detach().requires_grad_(needs_grad)
                with torch.enable_grad() if needs_grad else torch.no_grad():
                    with spec["autocast"]():  # the head product in the run's precision; sums below in fp32
                        logits = head(chunk)[..., :width]
                    logits = logits.float()  # [c, V]
                    teacher = teacher_rows(start, end)
                    if needs_grad and objective.has_gradient_rule(teacher):
                        # The terms' gradient with respect to the logits by hand; autograd only through the head.
                        sums, grad_logits = objective.row_sums_and_gradient(logits.detach(), teacher, targets[start:end],
                                                                            weights, spec["scratch"])
                        grads = torch.autograd.grad(logits, [chunk, *params], grad_logits, allow_unused=True)
                    elif needs_grad:
                        sums = objective.row_sums(logits, teacher, targets[start:end])
                        grads = torch.autograd.grad(_weighted(weights, sums), [chunk, *params], allow_unused=True)
                    else:
                        sums = objective.row_sums(logits, teacher, targets[start:end])
                    if needs_grad:
                        grad_hidden[start:end] = grads[0]
                        for accumulated, grad in zip(grad_params, grads[1:], strict=True):
                            if grad is not None:
                                accumulated += grad
                del logits  # free this chunk's logits before the next one
            for total, part in zip(totals, sums, strict=True):
                total += part.detach()
        if needs_grad:
            ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.needs_grad = needs_grad
        ctx.mark_non_differentiable(*totals)
        return (_weighted(weights, totals), *totals)

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
        if not ctx.needs_grad:
            return (None, None)
        grad_hidden, *grad_params = ctx.saved_tensors
        # In place: these buffers exist only for this backward, and a copy would double a head-sized tensor.
        return (grad_hidden.mul_(grad_total), None, *[g.mul_(grad_total) for g in grad_params])


def _weighted(weights: list[float], sums: list[torch.Tensor]) -> torch.Tensor:
    total = weights[0] * sums[0]
    for weight, part in zip(weights[1:], sums[1:], strict=True):
        total = total + weight * part
    return total


def _linear_chunk(hidden: torch.Tensor, linear: tuple[torch.Tensor, torch.Tensor | None], params: tuple[torch.Tensor, ...],
                  head_count: int, grad_hidden: torch.Tensor | None, grad_params: list[torch.Tensor], start: int, end: int,
                  teacher_rows: TeacherRows, targets: torch.Tensor, objective: Objective, width: int,
                  weights: list[float], needs_grad: bool, autocast: Autocast = _no_autocast,
                  scratch: Scratch | None = None) -> list[torch.Tensor]:
    """A plain linear head: gradients by hand (addmm into the accumulators), so no chunk allocates a
    head-sized gradient — with autograd each chunk would, which dominates time at large vocabularies.

    Only the real vocabulary rows `weight[:width]` are multiplied (a padded head's extra rows never are).
    Under mixed precision the logits and the hidden-state gradient are computed under the run's autocast,
    as the simple path's `F.linear` runs inside the model's forward; the loss and its gradient with respect
    to the logits are fp32.
    """
    weight, bias = linear
    extra = params[head_count:]
    rows_weight = weight[:width]
    with autocast():
        raw = torch.nn.functional.linear(hidden, rows_weight, bias[:width] if bias is not None else None)
    logits = raw.float()  # [c, V]
    teacher = teacher_rows(start, end)
    if needs_grad and objective.has_gradient_rule(teacher):
        # Every row term gives ∂/∂logits by hand: a few passes over [c, V] instead of autograd's graph.
        sums, grad_logits = objective.row_sums_and_gradient(logits, teacher, targets[start:end], weights,
                                                            scratch if scratch is not None else Scratch())
        grad_extra = [None] * len(extra)
    else:
        logits.requires_grad_(needs_grad)
        with torch.enable_grad() if needs_grad else torch.no_grad():
            sums = objective.row_sums(logits, teacher, targets[start:end])
            if needs_grad:
                grad_logits, *grad_extra = torch.autograd.grad(_weighted(weights, sums), [logits, *extra],
                                                               allow_unused=True)
    if needs_grad:
        assert grad_hidden is not None
        grad_logits = grad_logits.to(weight.dtype)
        with autocast():
            grad_hidden[start:end] = (grad_logits @ rows_weight).to(grad_hidden.dtype)
        for param, accumulated in zip(params[:head_count], grad_params[:head_count], strict=True):
            if param is weight:
                # In place and in fp32 (the master weights' dtype) even under autocast: a low-precision product
                # would need a head-sized temporary per chunk; fp32 accumulation is also the more exact one.
                # The buffer starts uninitialised (see _FusedLoss.forward): beta=0 ignores it on the first chunk.
                accumulated[:width].addmm_(grad_logits.T, hidden.to(weight.dtype), beta=0 if start == 0 else 1)
                if start == 0:
                    accumulated[width:].zero_()
            elif param is bias:
                accumulated[:width] += grad_logits.sum(0)
        for accumulated, grad in zip(grad_params[head_count:], grad_extra, strict=True):
            if grad is not None:
                accumulated += grad
    return [part.detach() for part in sums]


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    teacher_rows: TeacherRows,
    *,
    vocab_width: int,
    settings: LossSettings | None = None,
    objective: Objective | None = None,
    normalizer: float | torch.Tensor | None = None,
    head_parameters: list[torch.Tensor] | None = None,
    chunk_size: int | None = None,
    linear_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    autocast: Autocast | None = None,
) -> LossParts:
    """Same value and gradients as the simple engine on the full logits, computed chunk by chunk.

    student_hidden: [n, H] final hidden states of the n target tokens (after the model's last norm).
    student_head: maps [c, H] -> [c, >=V] logits (the model's output embedding, adapters included).
    targets: [n] labels. teacher_rows(start, end): the teacher's targets for those rows on the student's
    device (logits [c, V], a teacher mixture, or cached SparseTargets), or None when no term needs them.
    The loss is `objective`'s row terms, or the `settings` shorthand ([ce: 1-α, kd: α·τ²]).
    `head_parameters` defaults to the head module's trainable parameters; their gradients (and those of
    the objective's own parameters) are returned through autograd like any other. `linear_head=(weight,
    bias)` says the head is exactly `F.linear(x, weight, bias)`: its gradients are then accumulated in
    place, without per-chunk copies. A plain `nn.Linear` head is recognised by itself. `autocast` is the
    run's mixed-precision context (e.g. `accelerator.autocast`): each chunk's head products run under it,
    as the simple path's do inside the model's forward, while sums and log-softmax stay fp32. The default
    chunk size depends on the device (`chunk_rows`). `total` is differentiable; the parts are for logging.
    """
    if objective is None:
        objective = objective_from_settings(settings or LossSettings())
    if not objective.fused_supported:
        raise ValueError("this objective has a term the fused engine cannot chunk; use loss_impl=simple")
    n = student_hidden.shape[0]
    if linear_head is None and type(student_head) is nn.Linear:
        linear_head = (student_head.weight, student_head.bias)
    if head_parameters is None:
        if linear_head is not None:
            head_parameters = [p for p in linear_head if p is not None and p.requires_grad]
        elif isinstance(student_head, nn.Module):
            head_parameters = [p for p in student_head.parameters() if p.requires_grad]
        else:
            head_parameters = []
    extra = [p for p in objective.parameters() if p.requires_grad]
    params = [*head_parameters, *extra]
    denominator = normalizer if normalizer is not None else max(n, 1)
    denominator_value = float(denominator)
    spec = {
        "head": student_head, "teacher_rows": teacher_rows, "targets": targets, "objective": objective,
        "width": vocab_width, "rows": chunk_size or chunk_rows(vocab_width, student_hidden.device),
        "weights": [t.weight / denominator_value for t in objective.row_terms], "head_count": len(head_parameters),
        "linear": linear_head, "autocast": autocast or _no_autocast, "scratch": Scratch(),  # chunk temporaries, reused
        "needs_grad": torch.is_grad_enabled() and (student_hidden.requires_grad or any(p.requires_grad for p in params)),
    }
    if n == 0:
        zero = student_hidden.sum() * 0.0
        return LossParts(total=zero, task=zero.detach(), distill=zero.detach(), tokens=0)
    total, *sums = _FusedLoss.apply(student_hidden, spec, *params)
    parts = combine_terms(objective, sums, n, denominator)
    return LossParts(total=total, task=parts.task, distill=parts.distill, tokens=n, terms=parts.terms)


def dense_teacher_rows(teacher_hidden: torch.Tensor, teacher_head: Callable[[torch.Tensor], torch.Tensor],
                       vocab_width: int, device: torch.device) -> TeacherRows:
    """Teacher logits for a chunk, computed on the teacher's device from its hidden states, then moved."""

    @torch.no_grad()
    def rows(start: int, end: int) -> torch.Tensor:
        return teacher_head(teacher_hidden[start:end])[..., :vocab_width].to(device, non_blocking=True).float()

    return rows


def sparse_teacher_rows(targets: SparseTargets) -> TeacherRows:
    return targets.rows


class FusedEngine:
    """The default engine: the student's forward with its head swapped for a recorder (`capture_hidden`), so
    the body runs and no logits are computed; the final hidden states of the target rows [n, H] and the
    teacher's signal go through `fused_distillation_loss`."""

    name = "fused"

    def __init__(self, context: EngineContext) -> None:
        self.context = context

    def step(self, model: Any, inputs: dict[str, torch.Tensor], objective: Objective, teacher: Teacher | None,
             normalizer: Any) -> EngineStep:
        context = self.context
        mask, targets = target_rows(inputs)
        student_layers, teacher_layers = objective.hidden_layers()
        use_teacher = teacher is not None and "teacher" in objective.needs
        unwrapped = context.unwrap(model)
        head_module = output_head(unwrapped)
        with capture_hidden(unwrapped) as (store, head):
            outputs = model(**student_forward(inputs, bool(student_layers)))
        rows = store["hidden"][:, :-1][mask]  # [n, H]
        signal = teacher.signal(inputs, mask, rows.device, layers=teacher_layers) if use_teacher else None
        with gathered_head(unwrapped, head_module), context.teacher_heads():  # sharded heads, whole
            parts = fused_distillation_loss(
                rows, head, targets, signal.rows if signal is not None else (lambda start, end: None),
                vocab_width=context.vocab_width, objective=objective, normalizer=normalizer,
                head_parameters=[p for p in head_module.parameters() if p.requires_grad],
                chunk_size=context.chunk_tokens, linear_head=linear_parts(head_module),
                # The chunks' head products run in the run's precision, as the model's forward does.
                autocast=context.autocast,
            )
        parts = with_batch_terms(objective, parts, outputs, mask, student_layers, signal, normalizer)
        width = context.vocab_width
        return EngineStep(parts, outputs, lambda start, end: head(rows[start:end].detach())[..., :width])
