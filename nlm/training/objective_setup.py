"""Wiring of the run's objective: built from the config and the models, its learnable parts attached to the
student while training (so the optimiser, device placement, checkpoints and DDP see them), and saved apart
from the student at the end (`final/distill_projections.safetensors`), so `final/` stays a plain model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nlm.config.settings import TrainingConfig
from nlm.distill.hidden_states import HiddenShapes
from nlm.distill.objective import Objective, objective_from_config
from nlm.distill.teacher import Teacher
from nlm.errors import ConfigError
from nlm.models.prune import kept_layers

ATTACHED = "nlm_objective"  # the student's submodule holding the objective's learnable parts during training
PROJECTIONS_FILE = "distill_projections.safetensors"


def build_objective(config: TrainingConfig, student: Any, teacher: Teacher | None) -> Objective:
    """The run's objective, checked against what the teacher can supply."""
    distillation = config.distillation
    if distillation.temperature_mode != "fixed" and teacher is not None and not teacher.full_distribution:
        raise ConfigError(f"distillation.temperature_mode={distillation.temperature_mode} needs the teacher's whole "
                          "distribution; a teacher cache stores top-k log-probabilities at one temperature")
    shapes = None
    if distillation.hidden_states.weight > 0:
        if teacher is None or not teacher.hidden_layers:
            raise ConfigError("distillation.hidden_states needs one teacher's hidden states: a live teacher_model, or a "
                              "teacher cache built with distillation.hidden_states set (several teachers supply none)")
        shapes = HiddenShapes(int(student.config.num_hidden_layers), int(student.config.hidden_size),
                              int(teacher.hidden_layers), int(teacher.hidden_size()),
                              kept_layers(student.config, int(teacher.hidden_layers)))
    try:
        return objective_from_config(distillation, shapes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _touch_objective(model: Any, args: Any, output: Any) -> Any:
    """A zero that depends on each learnable part of the objective, added to the forward's output.

    The parts are used by the loss, after the forward: DDP (find_unused_parameters) walks the forward's
    outputs, finds no path to them, marks them ready at once — and again when their gradient arrives
    ("marked ready twice"). This zero gives them a path, as `capture_hidden` does for the output head. Added
    in place: no copy of the logits (empty under the fused loss, whole under the simple one).
    """
    attached = model._modules.get(ATTACHED)
    params = [p for p in attached.parameters() if p.requires_grad] if attached is not None else []
    logits = getattr(output, "logits", None)
    if params and logits is not None and logits.requires_grad:
        logits.add_((torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0).to(logits.dtype))
    return output


def attach_objective(model: Any, objective: Objective) -> None:
    modules = objective.modules()
    if modules:
        model.add_module(ATTACHED, torch.nn.ModuleDict({key.replace(".", "_"): m for key, m in modules.items()}))
        model._nlm_touch = model.register_forward_hook(_touch_objective)


def detach_objective(model: Any) -> None:
    """Take the objective's parts off the student before the final save (no unexpected keys in final/)."""
    model._modules.pop(ATTACHED, None)
    handle = model.__dict__.pop("_nlm_touch", None)
    if handle is not None:
        handle.remove()


def save_projections(objective: Objective, folder: Path) -> Path | None:
    term = objective.term("hidden_states")
    projections = getattr(term, "projections", None)
    if projections is None or not len(projections):
        return None
    path = Path(folder) / PROJECTIONS_FILE
    save_file({key: value.detach().float().cpu().contiguous() for key, value in projections.state_dict().items()}, str(path),
              metadata={"layers": str(getattr(term, "layers", {})), "format": "nlm-distill-projections"})
    return path


def describe_objective(objective: Objective, config: TrainingConfig) -> dict[str, Any]:
    """For training_metadata.json: terms and weights, the temperature mode and, when learned, its value."""
    out: dict[str, Any] = {"terms": [{"name": t.term.name, "weight": t.weight} for t in objective.terms],
                           "temperature_mode": config.distillation.temperature_mode}
    kd = objective.term("kd")
    temperature = getattr(kd, "temperature", None)
    if temperature is not None and hasattr(temperature, "value"):
        out["learned_temperature"] = float(temperature.value().detach())
    hidden = objective.term("hidden_states")
    if hidden is not None:
        out["hidden_states"] = {"layers": {str(k): v for k, v in hidden.layers.items()}, "loss": hidden.loss,
                                "projections": PROJECTIONS_FILE if len(hidden.projections) else None}
    return out
