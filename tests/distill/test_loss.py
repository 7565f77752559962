"""Mathematical properties of the divergences and the combined loss, checked against plain references."""

import math

import pytest
import torch
import torch.nn.functional as F

from nlm.distill.divergences import DIVERGENCES, token_divergence
from nlm.distill.loss import distillation_loss

torch.manual_seed(0)


def _logits(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape) * scale).to(dtype)


def _labels(b, s, v, masked=0.3):
    labels = torch.randint(0, v, (b, s))
    labels[torch.rand(b, s) < masked] = -100
    return labels


def reference_divergence(kind, teacher_logits, student_logits, beta=0.5, skew=0.1):
    """Straightforward probability-space formulas, in float64."""
    p = torch.softmax(teacher_logits.double(), -1)
    q = torch.softmax(student_logits.double(), -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_agrees_with_reference_on_random_inputs(kind):
    teacher, student = _logits(64, 50), _logits(64, 50)
    ours = token_divergence(kind, F.log_softmax(teacher, -1), F.log_softmax(student, -1))
    torch.testing.assert_close(ours.double(), reference_divergence(kind, teacher, student), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_on_identical_and_non_negative(kind):
    logits = _logits(32, 40)
    same = token_divergence(kind, F.log_softmax(logits, -1), F.log_softmax(logits, -1))
    assert same.abs().max() < 1e-5
    other = token_divergence(kind, F.log_softmax(logits, -1), F.log_softmax(_logits(32, 40), -1))
    assert (other >= -1e-6).all() and other.mean() > 0


def test_jsd_symmetric_at_half_and_tvd_symmetric():
    a, b = F.log_softmax(_logits(16, 30), -1), F.log_softmax(_logits(16, 30), -1)
    torch.testing.assert_close(token_divergence("jsd", a, b), token_divergence("jsd", b, a))
    torch.testing.assert_close(token_divergence("tvd", a, b), token_divergence("tvd", b, a))
    assert (token_divergence("jsd", a, b) <= math.log(2) + 1e-6).all()


def test_skew_kl_with_zero_skew_is_forward_kl():
    a, b = F.log_softmax(_logits(16, 30), -1), F.log_softmax(_logits(16, 30), -1)
    torch.testing.assert_close(token_divergence("skew_kl", a, b, skew_lambda=0.0), token_divergence("forward_kl", a, b))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_safe_when_teacher_puts_zero_mass_on_a_token(kind):
    teacher = _logits(8, 20)
    teacher[:, :5] = float("-inf")  # exactly zero probability
    student = _logits(8, 20, scale=1.0).requires_grad_()
    value = token_divergence(kind, F.log_softmax(teacher, -1), F.log_softmax(student, -1)).sum()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def test_alpha_zero_is_plain_cross_entropy():
    s, t, labels = _logits(2, 7, 30), _logits(2, 7, 30), _labels(2, 7, 30)
    parts = distillation_loss(s, t, labels, alpha=0.0)
    torch.testing.assert_close(parts.total, F.cross_entropy(s.reshape(-1, 30), labels.reshape(-1), ignore_index=-100))


def test_alpha_one_ignores_labels():
    s, t = _logits(2, 7, 30), _logits(2, 7, 30)
    labels_a = _labels(2, 7, 30, masked=0.0)
    labels_b = (labels_a + 1) % 30  # different targets, same positions
    a = distillation_loss(s, t, labels_a, alpha=1.0).total
    b = distillation_loss(s, t, labels_b, alpha=1.0).total
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_temperature_squared_scaling(temperature):
    s, t, labels = _logits(2, 5, 20), _logits(2, 5, 20), _labels(2, 5, 20, masked=0.0)
    parts = distillation_loss(s, t, labels, alpha=1.0, temperature=temperature)
    expected = reference_divergence("forward_kl", t / temperature, s / temperature).mean() * temperature**2
    torch.testing.assert_close(parts.total.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts.total, temperature**2 * parts.distill)


def test_combined_value_matches_formula():
    s, t, labels = _logits(3, 6, 25), _logits(3, 6, 25), _labels(3, 6, 25)
    parts = distillation_loss(s, t, labels, alpha=0.3, temperature=2.0)
    keep = labels.reshape(-1) != -100
    ce = F.cross_entropy(s.reshape(-1, 25)[keep], labels.reshape(-1)[keep])
    kl = reference_divergence("forward_kl", t.reshape(-1, 25)[keep] / 2, s.reshape(-1, 25)[keep] / 2).mean()
    torch.testing.assert_close(parts.total.double(), 0.7 * ce.double() + 0.3 * 4 * kl, rtol=1e-5, atol=1e-6)
    assert parts.tokens == int(keep.sum())


def test_masked_positions_do_not_matter():
    s, t, labels = _logits(2, 6, 20), _logits(2, 6, 20), _labels(2, 6, 20, masked=0.5)
    s2, t2 = s.clone(), t.clone()
    masked = labels == -100
    s2[masked] = _logits(int(masked.sum()), 20)
    t2[masked] = _logits(int(masked.sum()), 20)
    torch.testing.assert_close(distillation_loss(s, t, labels).total, distillation_loss(s2, t2, labels).total)


def test_bf16_inputs_are_accumulated_in_fp32():
    s, t, labels = _logits(2, 8, 64), _logits(2, 8, 64), _labels(2, 8, 64)
    low = distillation_loss(s.bfloat16(), t.bfloat16(), labels)
    high = distillation_loss(s.bfloat16().float(), t.bfloat16().float(), labels)
    assert low.total.dtype == torch.float32
    torch.testing.assert_close(low.total, high.total)


def test_normalizer_replaces_the_token_count():
    s, t, labels = _logits(2, 6, 20), _logits(2, 6, 20), _labels(2, 6, 20, masked=0.0)
    mean = distillation_loss(s, t, labels).total
    summed = distillation_loss(s, t, labels, normalizer=1.0).total
    torch.testing.assert_close(summed, mean * 12)


def test_both_parts_carry_gradient_to_the_student():
    s, t, labels = _logits(2, 5, 16).requires_grad_(), _logits(2, 5, 16), _labels(2, 5, 16, masked=0.0)
    parts = distillation_loss(s, t, labels, alpha=0.5)
    (task_grad,) = torch.autograd.grad(parts.task, s, retain_graph=True)
    (distill_grad,) = torch.autograd.grad(parts.distill, s, retain_graph=True)
    (total_grad,) = torch.autograd.grad(parts.total, s)
    assert task_grad.abs().sum() > 0 and distill_grad.abs().sum() > 0
    torch.testing.assert_close(total_grad, 0.5 * task_grad + 0.5 * 4 * distill_grad)
    assert t.grad is None


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradcheck_float64(kind):
    s = _logits(2, 3, 7, dtype=torch.float64, scale=1.0).requires_grad_()
    t = _logits(2, 3, 7, dtype=torch.float64, scale=1.0)
    labels = torch.tensor([[1, -100, 3], [0, 6, -100]])

    def fn(student):
        return distillation_loss(student, t, labels, alpha=0.6, temperature=1.5, divergence=kind).total

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


def test_width_mismatch_is_an_error():
    with pytest.raises(ValueError, match="vocabulary widths differ"):
        distillation_loss(_logits(1, 2, 10), _logits(1, 2, 12), torch.zeros(1, 2, dtype=torch.long))


def test_the_config_choices_are_the_registered_divergences_and_free_options_are_checked():
    from nlm.config.settings import DIVERGENCE_NAMES
    from nlm.distill.divergences import REGISTRY, divergence_arguments

    assert DIVERGENCE_NAMES == tuple(REGISTRY)
    assert divergence_arguments("jsd", {"jsd_beta": 0.3}) == {"beta": 0.3}
    with pytest.raises(ValueError, match=r"\['beta'\] are not options of tvd"):
        divergence_arguments("tvd", {"divergence_options": {"beta": 0.3}})
