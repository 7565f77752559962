"""A teacher cache whose slots hold the top tokens plus draws from the tail (`--tail_samples`)."""

import json
import math

import torch

from nlm.apps.train import train
from nlm.cli import main
from nlm.config.sources import load_config
from nlm.distill.cache import TeacherCache, rounded_targets, sampled_tail
from nlm.distill.loss import LossSettings, SparseTargets, objective_from_settings


def _teacher(rows=3, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=generator) * 2, -1)


def _dense(ids, logp, vocab):
    """The listed probabilities as a dense [n, V] distribution (duplicates summed; -inf slots add nothing)."""
    return torch.zeros(ids.shape[0], vocab, dtype=torch.float64).scatter_add_(-1, ids, logp.double().exp())


def test_draws_sum_to_one_keep_the_head_exactly_and_are_unbiased_token_by_token():
    logp = _teacher()
    head = 8
    runs = [sampled_tail(logp, head, 24, torch.Generator().manual_seed(seed)) for seed in range(600)]
    ids, values = runs[0]
    assert ids.shape == values.shape == (3, head + 24)
    top = logp.topk(head, -1)
    assert torch.equal(ids[:, :head], top.indices) and torch.equal(values[:, :head], top.values)
    for _ids, values in runs[:20]:
        torch.testing.assert_close(values.double().exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
        assert not (values[:, head:] > torch.log(1 - top.values.exp().sum(-1, keepdim=True)) + 1e-6).any()
    mean = torch.stack([_dense(ids, values, 50) for ids, values in runs]).mean(0)
    p = logp.double().exp()
    # Each tail token's estimate is T·Binomial(24, p_i/T)/24: its mean over 600 builds is within 4 standard errors.
    tail = p.clone().scatter_(-1, top.indices, 0)
    mass = tail.sum(-1, keepdim=True)
    stderr = (mass * (tail / mass * (1 - tail / mass) / 24).sqrt() / 600**0.5).clamp_min(1e-9)
    assert ((mean - p).abs() <= 4 * stderr + 1e-12).all()


def test_forward_kl_gradient_from_many_draws_equals_the_dense_gradient():
    """The loss's gradient against sampled targets, q - p̂, tends to the live teacher's q - p (same loss code)."""
    logp = _teacher(rows=4, vocab=40, seed=1)
    student = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    objective = objective_from_settings(LossSettings(alpha=1.0, temperature=1.0))
    labels = torch.zeros(4, dtype=torch.long)

    def grad(teacher):
        logits = student.clone().requires_grad_(True)
        objective.term("kd").row_sum(logits, teacher, labels).backward()
        return logits.grad

    dense = grad(logp.exp().log())  # a dense teacher given as logits (log-probs are logits at τ = 1)
    ids, values = sampled_tail(logp, 4, 20_000, torch.Generator().manual_seed(3))
    stored, _ = rounded_targets(values)
    targets = SparseTargets(ids, stored.float(), torch.full((4,), float("-inf")))
    sparse = grad(targets)
    torch.testing.assert_close(sparse, dense, atol=2e-2, rtol=0)
    assert torch.isfinite(sparse).all()
    # The trainer's fused path (gradient by hand) gives the same gradient as autograd on the same targets.
    _, fused = objective.term("kd").row_sum_and_gradient(student.clone(), targets, labels, 1.0, None)
    torch.testing.assert_close(fused, sparse, atol=1e-5, rtol=1e-4)


def test_a_row_with_all_mass_in_the_head_lists_no_draw_mass():
    logp = torch.full((1, 10), float("-inf"))
    logp[0, 3] = 0.0
    ids, values = sampled_tail(logp, 2, 5, torch.Generator().manual_seed(0))
    assert ids[0, 0] == 3 and values[0, 0] == 0
    assert torch.isinf(values[0, 2:]).all()


def test_cli_builds_a_sampled_cache_and_training_from_it_checks_the_divergence(model_dirs, pc_file, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--train_file", str(pc_file), "--output", str(out),
                 "--top_k", "16", "--tail_samples", "12"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tail_samples"] == 12 and manifest["fingerprint"]["tail_samples"] == 12
    targets = TeacherCache(out).targets([0, 5])
    assert targets.ids.shape[1] == 16 and torch.isinf(targets.tail_logp).all()
    total = targets.logp.double().exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=2e-3, rtol=0)  # fp16, each value rounded down

    common = ["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--teacher_cache", str(out)]
    result = train(load_config([*common, "--output_dir", str(tmp_path / "ok")]).config)
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    capsys.readouterr()
    code = main(["train", *common, "--output_dir", str(tmp_path / "rkl"), "--distillation.divergence", "reverse_kl"])
    err = capsys.readouterr().err
    assert code == 2 and "tail_samples" in err and "forward_kl" in err and "Traceback" not in err
    assert main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--train_file", str(pc_file), "--output",
                 str(tmp_path / "bad"), "--top_k", "8", "--tail_samples", "8"]) == 2
    assert "tail_samples = 8" in capsys.readouterr().err
