"""The seams: divergences and loss terms registered by name, the α/τ shorthand, the Teacher protocol."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from nlm.config.settings import DistillationConfig, Divergence
from nlm.distill import divergences
from nlm.distill.divergences import REGISTRY, register_divergence, token_divergence
from nlm.distill.engines.fused import fused_distillation_loss
from nlm.distill.loss import distillation_loss
from nlm.distill.objective import (
    TERMS,
    CrossEntropyTerm,
    DistillationTerm,
    LossTerm,
    Objective,
    WeightedTerm,
    objective_from_config,
    register_term,
)


def test_every_configurable_divergence_is_registered_and_nothing_else():
    assert set(typing.get_args(Divergence)) == set(REGISTRY) == set(divergences.DIVERGENCES)


def test_a_registered_divergence_reaches_both_engines():
    @register_divergence("test_hellinger")
    def hellinger(teacher_logp, student_logp):
        return 1 - torch.exp((teacher_logp + student_logp) / 2).sum(-1)

    try:
        torch.manual_seed(0)
        hidden, head = torch.randn(11, 8, requires_grad=True), nn.Linear(8, 20)
        teacher, labels = torch.randn(11, 20), torch.randint(0, 20, (11,))
        objective = Objective([WeightedTerm(CrossEntropyTerm(), 0.5), WeightedTerm(DistillationTerm("test_hellinger", 2.0), 2.0)])
        simple = distillation_loss(head(hidden), teacher, labels, objective=objective)
        fused = fused_distillation_loss(hidden, head, labels, lambda s, e: teacher[s:e], vocab_width=20,
                                        objective=objective, chunk_size=4)
        p, q = torch.softmax(teacher / 2, -1), torch.softmax(head(hidden).detach() / 2, -1)
        expected = 1 - (p * q).sqrt().sum(-1)
        torch.testing.assert_close(simple.distill.detach(), expected.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(fused.total, hidden)[0], torch.autograd.grad(simple.total, hidden)[0],
                                   rtol=1e-5, atol=1e-6)
    finally:
        del REGISTRY["test_hellinger"]


def test_divergence_names_and_duplicates_are_checked():
    with pytest.raises(ValueError, match="unknown divergence 'nope'"):
        token_divergence("nope", torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("jsd")(lambda t, s: t)


def test_registered_options_come_from_the_settings():
    torch.manual_seed(1)
    t, s = torch.log_softmax(torch.randn(5, 9), -1), torch.log_softmax(torch.randn(5, 9), -1)
    torch.testing.assert_close(token_divergence("jsd", t, s, jsd_beta=0.2), divergences.jsd(t, s, 0.2))
    torch.testing.assert_close(token_divergence("skew_kl", t, s, skew_lambda=0.3), divergences.skew_kl(t, s, 0.3))


def test_the_shorthand_is_ce_and_kd_with_alpha_and_tau_squared():
    objective = objective_from_config(DistillationConfig(alpha=0.3, temperature=3.0, divergence="reverse_kl"))
    assert [(t.term.name, t.weight) for t in objective.terms] == [("ce", 0.7), ("kd", 0.3 * 9.0)]
    assert objective.needs == {"labels", "teacher"} and objective.fused_supported
    assert objective_from_config(DistillationConfig(alpha=0.0)).needs == {"labels"}  # no teacher needed


def test_a_term_that_cannot_be_chunked_is_refused_by_the_fused_engine():
    @register_term("test_whole_sequence")
    class WholeSequence(LossTerm):
        needs = frozenset({"labels"})
        fused = False

        def row_sum(self, student, teacher, labels):
            return student.logsumexp(-1).sum()

    try:
        objective = Objective([WeightedTerm(WholeSequence(), 1.0)])
        assert not objective.fused_supported
        with pytest.raises(ValueError, match="use loss_impl=simple"):
            fused_distillation_loss(torch.randn(3, 4), nn.Linear(4, 5), torch.zeros(3, dtype=torch.long),
                                    lambda s, e: None, vocab_width=5, objective=objective)
        parts = distillation_loss(torch.randn(3, 5), None, torch.zeros(3, dtype=torch.long), objective=objective)
        assert parts.terms["test_whole_sequence"].ndim == 0
    finally:
        del TERMS["test_whole_sequence"]


def test_every_teacher_kind_implements_the_protocol(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from nlm.distill.teacher import EnsembleTeacher, LiveTeacher, Teacher

    model = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"])
    live = LiveTeacher(model, "cpu", 300)
    assert isinstance(live, Teacher) and isinstance(EnsembleTeacher([live], [1.0]), Teacher)
    ids = torch.randint(0, 300, (2, 7))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    signal = live.signal({"input_ids": ids}, mask, torch.device("cpu"), layers=(1,))
    full = live.signal({"input_ids": ids}, mask, torch.device("cpu"), full_logits=True)
    assert signal.count == 10 and signal.hidden[1].shape == (10, model.config.hidden_size)
    torch.testing.assert_close(signal.rows(3, 8), full.rows(3, 8), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(signal.all_rows(), model(ids).logits[:, :-1][mask], rtol=1e-4, atol=1e-5)


def _autograd_reference(objective, student, teacher, labels, weights):
    logits = student.clone().requires_grad_(True)
    sums = objective.row_sums(logits, teacher, labels)
    total = sum(w * s for w, s in zip(weights, sums, strict=True))
    (grad,) = torch.autograd.grad(total, [logits])
    return [s.detach() for s in sums], grad


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"])
@pytest.mark.parametrize("kind", ["dense", "mixture", "sparse"])
def test_hand_written_gradients_equal_autograd(divergence, kind):
    from nlm.distill.targets import MixtureLogits, SparseTargets, tail_logp

    generator = torch.Generator().manual_seed(3)
    student = torch.randn(9, 30, generator=generator, dtype=torch.float64) * 3
    logits = torch.randn(9, 30, generator=generator, dtype=torch.float64) * 3
    logits[0, :4] = -torch.inf  # a teacher with no mass on some tokens
    labels = torch.randint(0, 30, (9,), generator=generator)
    labels[2] = -100  # ignored by the cross-entropy
    teacher = logits
    if kind == "sparse":
        top = torch.log_softmax(logits / 2, -1).topk(5, -1)
        teacher = SparseTargets(ids=top.indices, logp=top.values, tail_logp=tail_logp(top.values))
    elif kind == "mixture":
        teacher = MixtureLogits([logits, torch.randn(9, 30, generator=generator, dtype=torch.float64)], [0.3, 0.7])
    objective = objective_from_config(DistillationConfig(alpha=0.4, temperature=2.0, divergence=divergence))
    weights = [0.6 / 7, 0.4 * 4 / 7]
    if not objective.has_gradient_rule(teacher):
        assert kind != "sparse" and divergence != "forward_kl"  # autograd stays the route for these
        return
    sums, grad = objective.row_sums_and_gradient(student, teacher, labels, weights)
    expected_sums, expected_grad = _autograd_reference(objective, student, teacher, labels, weights)
    for found, expected in zip(sums, expected_sums, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_hand_written_gradients_skip_a_zero_weight_teacher_term_and_keep_adaptive_temperatures_on_autograd():
    objective = objective_from_config(DistillationConfig(alpha=0.0, temperature=2.0))
    student, labels = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 10, (4,))
    sums, grad = objective.row_sums_and_gradient(student, torch.randn(4, 10, dtype=torch.float64), labels, [0.25, 0.0])
    expected_sums, expected_grad = _autograd_reference(objective, student, None, labels, [0.25, 0.0])
    torch.testing.assert_close(sums[0], expected_sums[0])
    assert sums[1].item() == 0.0
    torch.testing.assert_close(grad, expected_grad)
    adaptive = objective_from_config(DistillationConfig(temperature_mode="entropy"))
    assert not adaptive.has_gradient_rule(torch.randn(4, 10))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_reused_scratch_buffers_give_the_same_values_on_a_smaller_later_chunk(kind):
    from nlm.distill.objective import Scratch
    from nlm.distill.targets import SparseTargets, tail_logp

    generator = torch.Generator().manual_seed(5)
    student, logits = torch.randn(9, 30, generator=generator), torch.randn(9, 30, generator=generator)
    labels = torch.randint(0, 30, (9,), generator=generator)
    teacher = logits
    if kind == "sparse":
        top = torch.log_softmax(logits / 2, -1).topk(5, -1)
        teacher = SparseTargets(ids=top.indices, logp=top.values, tail_logp=tail_logp(top.values))
    part = teacher[:4] if kind == "dense" else teacher.rows(0, 4)
    objective, weights = objective_from_config(DistillationConfig()), [0.1, 0.2]
    scratch = Scratch()
    objective.row_sums_and_gradient(student, teacher, labels, weights, scratch)  # the first, larger chunk
    sums, grad = objective.row_sums_and_gradient(student[:4], part, labels[:4], weights, scratch)
    expected_sums, expected_grad = _autograd_reference(objective, student[:4], part, labels[:4], weights)
    torch.testing.assert_close(torch.stack(sums), torch.stack(expected_sums))
    torch.testing.assert_close(grad, expected_grad)
