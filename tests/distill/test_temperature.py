"""Adaptive temperature: entropy mode reaches its target, fixed mode is today's loss, learned mode trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlm.config.settings import DistillationConfig
from nlm.distill.engines.fused import fused_distillation_loss
from nlm.distill.loss import LossSettings, distillation_loss, objective_from_settings
from nlm.distill.objective import objective_from_config
from nlm.distill.targets import MixtureLogits, target_logp
from nlm.distill.temperature import LearnedTemperature, entropy, entropy_temperature


def _teacher(n=40, v=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1.3, n).unsqueeze(1)  # from flat to very peaked rows
    return torch.randn(n, v, generator=generator) * scales


@pytest.mark.parametrize("target", [0.5, 1.5, 3.0])
def test_entropy_mode_hits_its_target_entropy(target):
    logits = _teacher()
    tau = entropy_temperature(logits, target, 0.05, 50.0)
    reached = entropy(target_logp(logits, tau))
    inside = (tau.squeeze(-1) > 0.0501) & (tau.squeeze(-1) < 49.9)
    assert inside.sum() > 30  # most rows can reach the target within the bounds
    torch.testing.assert_close(reached[inside], torch.full_like(reached[inside], target), rtol=0, atol=1e-3)
    # rows pinned at a bound could not reach it: at the lower bound they are already too open, at the upper too sharp
    assert (reached[tau.squeeze(-1) <= 0.0501] >= target - 1e-3).all()
    assert (reached[tau.squeeze(-1) >= 49.9] <= target + 1e-3).all()


def test_entropy_mode_on_a_teacher_mixture_hits_the_target_of_the_mixture():
    rows = MixtureLogits([_teacher(seed=1), _teacher(seed=2)], [0.3, 0.7])
    tau = entropy_temperature(rows, 2.0, 0.01, 50.0).squeeze(-1)
    inside = (tau > 0.0101) & (tau < 49.9)
    assert inside.sum() > 30
    reached = entropy(target_logp(rows, tau.unsqueeze(-1)))
    torch.testing.assert_close(reached[inside], torch.full_like(reached[inside], 2.0), rtol=0, atol=1e-3)


def test_fixed_mode_is_todays_loss_exactly():
    torch.manual_seed(3)
    student, teacher, labels = torch.randn(2, 7, 30), torch.randn(2, 7, 30), torch.randint(0, 30, (2, 7))
    for divergence in ("forward_kl", "jsd", "skew_kl"):
        config = DistillationConfig(alpha=0.4, temperature=3.0, divergence=divergence, temperature_mode="fixed")
        via_config = distillation_loss(student, teacher, labels, objective=objective_from_config(config))
        shorthand = distillation_loss(student, teacher, labels, alpha=0.4, temperature=3.0, divergence=divergence)
        assert torch.equal(via_config.total, shorthand.total) and torch.equal(via_config.distill, shorthand.distill)


def test_entropy_mode_scales_each_token_by_its_own_tau_squared():
    torch.manual_seed(4)
    student, teacher, labels = torch.randn(12, 30), _teacher(12, 30), torch.randint(0, 30, (12,))
    config = DistillationConfig(alpha=0.5, temperature_mode="entropy", target_entropy=1.2, temperature_min=0.2,
                                temperature_max=20.0)
    objective = objective_from_config(config)
    assert [t.weight for t in objective.terms] == [0.5, 0.5]  # α, not α·τ²: τ² is inside, per token
    parts = distillation_loss(student, teacher, labels, objective=objective)
    tau = entropy_temperature(teacher, 1.2, 0.2, 20.0)
    p_logp, q_logp = F.log_softmax(teacher / tau, -1), F.log_softmax(student / tau, -1)
    per_token = (p_logp.exp() * (p_logp - q_logp)).sum(-1) * tau.squeeze(-1) ** 2
    torch.testing.assert_close(parts.distill, per_token.mean(), rtol=1e-5, atol=1e-6)
    stats = objective.pop_stats()
    assert stats["temperature_min"] == pytest.approx(tau.min().item(), rel=1e-5)
    assert stats["temperature_max"] == pytest.approx(tau.max().item(), rel=1e-5)
    assert stats["temperature_mean"] == pytest.approx(tau.mean().item(), rel=1e-5)
    assert objective.pop_stats() == {}  # reset after each log


def test_entropy_mode_fused_equals_simple():
    torch.manual_seed(5)
    hidden, head = torch.randn(17, 8, requires_grad=True), nn.Linear(8, 30)
    teacher, labels = _teacher(17, 30), torch.randint(0, 30, (17,))
    objective = objective_from_config(DistillationConfig(temperature_mode="entropy", target_entropy=1.0))
    simple = distillation_loss(head(hidden), teacher, labels, objective=objective)
    fused = fused_distillation_loss(hidden, head, labels, lambda s, e: teacher[s:e], vocab_width=30, objective=objective, chunk_size=5)
    torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fused.total, hidden)[0], torch.autograd.grad(simple.total, hidden)[0],
                               rtol=1e-5, atol=1e-6)


def test_learned_temperature_is_bounded_and_climbs_the_loss_it_is_reversed_against():
    policy = LearnedTemperature(2.0, 1.0, 4.0)
    assert policy.value().item() == pytest.approx(2.0)
    torch.manual_seed(6)
    hidden, head = torch.randn(20, 8, requires_grad=True), nn.Linear(8, 30)
    teacher, labels = torch.randn(20, 30) * 3, torch.randint(0, 30, (20,))
    config = DistillationConfig(alpha=1.0, temperature=2.0, temperature_mode="learned", temperature_min=1.0, temperature_max=4.0)
    objective = objective_from_config(config)
    learned = objective.term("kd").temperature
    (logit,) = objective.parameters()
    fused = fused_distillation_loss(hidden, head, labels, lambda s, e: teacher[s:e], vocab_width=30, objective=objective, chunk_size=6)
    simple = distillation_loss(head(hidden), teacher, labels, objective=objective)
    grad_fused = torch.autograd.grad(fused.total, logit)[0]
    grad_simple = torch.autograd.grad(simple.total, logit)[0]
    torch.testing.assert_close(grad_fused, grad_simple, rtol=1e-4, atol=1e-7)

    def kd_at(tau):
        p, q = F.log_softmax(teacher / tau, -1), F.log_softmax(head(hidden).detach() / tau, -1)
        return ((p.exp() * (p - q)).sum(-1)).mean() * 2.0**2  # τ² of the value used, held fixed

    # reversed: the gradient points up the divergence (descending it moves τ where the mismatch is larger)
    slope = (kd_at(2.0 + 1e-3) - kd_at(2.0 - 1e-3)) / 2e-3
    dtau_dlogit = (4.0 - 1.0) * (1 / 3) * (2 / 3)  # τ = 1 + 3·σ(θ), σ = 1/3 at τ = 2
    assert math.copysign(1, grad_simple.item()) == -math.copysign(1, slope.item())
    assert grad_simple.item() == pytest.approx(-slope.item() * dtau_dlogit, rel=1e-2)
    with torch.no_grad():
        logit.fill_(50.0)
    assert learned.value().item() <= 4.0  # bounded whatever the optimiser does
    with pytest.raises(ValueError, match="strictly between"):
        LearnedTemperature(5.0, 1.0, 4.0)


def test_config_checks_the_bounds():
    with pytest.raises(ValueError, match="temperature_min must be below"):
        DistillationConfig(temperature_min=3.0, temperature_max=2.0)
    with pytest.raises(ValueError, match="between temperature_min and temperature_max"):
        DistillationConfig(temperature_mode="learned", temperature=10.0, temperature_max=8.0)


def test_shorthand_objective_is_unchanged_by_the_new_settings():
    settings = LossSettings(alpha=0.3, temperature=1.5)
    assert [t.weight for t in objective_from_settings(settings).terms] == [t.weight for t in objective_from_config(
        DistillationConfig(alpha=0.3, temperature=1.5)).terms]


@pytest.mark.slow
def test_runs_log_the_temperature_and_save_the_learned_one(model_dirs, pc_file, tmp_path):
    import json

    from nlm.apps.train import train
    from nlm.config.sources import load_config

    base = ["--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
            "--train_file", str(pc_file), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
            "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no"]
    entropy_run = train(load_config([*base, "--output_dir", str(tmp_path / "e"), "--distillation.temperature_mode", "entropy",
                                     "--distillation.target_entropy", "2.0"]).config)
    history = json.loads((entropy_run.final_dir / "training_metadata.json").read_text())["log_history"]
    logged = [e for e in history if "temperature_mean" in e]
    assert len(logged) == 3
    assert all(0.5 <= e["temperature_min"] <= e["temperature_mean"] <= e["temperature_max"] <= 8.0 for e in logged)
    learned_run = train(load_config([*base, "--output_dir", str(tmp_path / "l"), "--distillation.temperature_mode", "learned",
                                     "--loss_impl", "simple"]).config)
    metadata = json.loads((learned_run.final_dir / "training_metadata.json").read_text())
    value = metadata["objective"]["learned_temperature"]
    assert 0.5 < value < 8.0 and value != pytest.approx(2.0, abs=1e-6)  # it moved, within its bounds
    assert metadata["log_history"][-2]["temperature_mean"] == pytest.approx(value, abs=0.5)
