"""The cross-tokenizer objective: equal to today's loss when the tokenizers are the same; gradient to the student only."""

from __future__ import annotations

import pytest
import torch

from nlm.data.tokenize import PaddingCollator, TokenizeSettings, tokenize_records
from nlm.distill.aligned_teacher import AlignedTeacher
from nlm.distill.cross_vocab import build_vocab_map
from nlm.distill.engines.aligned import CrossSettings, cross_tokenizer_loss
from nlm.distill.engines.fused import fused_distillation_loss
from nlm.distill.loss import LossSettings
from nlm.distill.teacher import LiveTeacher
from nlm.models.heads import capture_hidden, output_head
from nlm.models.scratch import build_causal_lm, build_tokenizer
from tests.conftest import write_jsonl

CORPUS = ["question: what is two plus two? answer: four", "the quick brown fox jumps over the lazy dog",
          "héllo wörld 🙂 naïve café"] * 10


def _batch(tmp_path, student_tok, teacher_tok):
    rows = [{"prompt": f"question: what is {i} plus {i}?", "completion": f" answer: {2 * i} the lazy dog"} for i in range(5)]
    data = tokenize_records([write_jsonl(tmp_path / "d.jsonl", rows)], student_tok, TokenizeSettings(max_seq_length=64),
                            teacher_tokenizer=teacher_tok).dataset
    return PaddingCollator(student_tok.pad_token_id, teacher_pad_token_id=teacher_tok.pad_token_id)([data[i] for i in range(len(data))])


def _student_hidden(model, batch):
    with capture_hidden(model) as (store, head):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return store["hidden"], head


def test_hybrid_with_identical_tokenizers_equals_todays_loss(tmp_path):
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    vocab_width = len(tokenizer)
    batch = _batch(tmp_path, tokenizer, tokenizer)
    settings = LossSettings(alpha=0.5, temperature=2.0, divergence="forward_kl")
    teacher_model = build_causal_lm("llama", vocab_size=vocab_width, hidden_size=48, num_layers=2, seed=3)
    student = build_causal_lm("llama", vocab_size=vocab_width, hidden_size=32, num_layers=1, seed=4)

    mask = batch["labels"][:, 1:] != -100
    # today's path
    hidden, head = _student_hidden(student, batch)
    rows = hidden[:, :-1][mask]
    live = LiveTeacher(teacher_model, "cpu", vocab_width)
    expected = fused_distillation_loss(rows, head, batch["labels"][:, 1:][mask], live.row_source(batch, mask, rows.device),
                                       vocab_width=vocab_width, settings=settings,
                                       head_parameters=list(output_head(student).parameters()))
    expected.total.backward()
    expected_grad = output_head(student).weight.grad.clone()
    student.zero_grad()

    # the cross-tokenizer path with the same tokenizer on both sides
    assert (batch["align_student"] >= 0).sum() == mask.sum()  # every target is a group start
    teacher = AlignedTeacher(teacher_model, "cpu", vocab_width)
    hidden, head = _student_hidden(student, batch)
    vocab = build_vocab_map(tokenizer, tokenizer, vocab_width, vocab_width)
    got = cross_tokenizer_loss(hidden, head, batch, teacher.groups(batch, hidden.device), settings,
                               CrossSettings("hybrid"), vocab, vocab_width=vocab_width, chunk_size=7,
                               head_parameters=list(output_head(student).parameters()))
    got.total.backward()
    assert got.total.item() == pytest.approx(expected.total.item(), abs=1e-6)
    assert got.distill.item() == pytest.approx(expected.distill.item(), abs=1e-6)
    assert torch.allclose(output_head(student).weight.grad, expected_grad, atol=1e-6)


@pytest.mark.parametrize("method", ["uld", "hybrid", "alm"])
def test_different_tokenizers_train_the_student_and_never_the_teacher(tmp_path, method):
    student_tok = build_tokenizer(CORPUS, vocab_size=290)
    teacher_tok = build_tokenizer(CORPUS, vocab_size=420)
    batch = _batch(tmp_path, student_tok, teacher_tok)
    teacher_model = build_causal_lm("llama", vocab_size=len(teacher_tok), hidden_size=48, num_layers=2, seed=3)
    student = build_causal_lm("llama", vocab_size=len(student_tok), hidden_size=32, num_layers=1, seed=4)
    teacher = AlignedTeacher(teacher_model, "cpu", len(teacher_tok), cross=CrossSettings(method))
    vocab = build_vocab_map(teacher_tok, student_tok, len(teacher_tok), len(student_tok))
    hidden, head = _student_hidden(student, batch)
    parts = cross_tokenizer_loss(hidden, head, batch, teacher.groups(batch, hidden.device),
                                 LossSettings(alpha=0.5, temperature=2.0), CrossSettings(method), vocab,
                                 vocab_width=len(student_tok), head_parameters=list(output_head(student).parameters()))
    parts.total.backward()
    assert torch.isfinite(parts.total) and parts.distill.item() > 0
    assert all(p.grad is None for p in teacher_model.parameters())
    assert output_head(student).weight.grad.abs().sum() > 0
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0  # the divergence reaches the body too


def test_alm_with_identical_tokenizers_is_the_binary_kl_of_each_target_tokens_probability(tmp_path):
    """With one tokenizer every group is one token: ALM = Σ KL(Bern(p_t(y)) ‖ Bern(p_s(y))) over target tokens,
    the models' own probabilities (τ does not apply, nor does τ²), normalised by the target count — computed
    here by hand from full logits."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    width = len(tokenizer)
    batch = _batch(tmp_path, tokenizer, tokenizer)
    teacher_model = build_causal_lm("llama", vocab_size=width, hidden_size=48, num_layers=2, seed=3)
    student = build_causal_lm("llama", vocab_size=width, hidden_size=32, num_layers=1, seed=4)
    settings = LossSettings(alpha=0.5, temperature=2.0)  # τ does not reach alm
    mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][mask]
    with torch.no_grad():
        t_logits = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    p_t = torch.softmax(t_logits, -1).gather(-1, targets[:, None]).squeeze(-1).double()
    p_s = torch.softmax(s_logits, -1).gather(-1, targets[:, None]).squeeze(-1).double()
    by_hand = (p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()).sum() / mask.sum()
    ce = torch.nn.functional.cross_entropy(s_logits, targets)

    teacher = AlignedTeacher(teacher_model, "cpu", width, cross=CrossSettings("alm"))
    hidden, head = _student_hidden(student, batch)
    got = cross_tokenizer_loss(hidden, head, batch, teacher.groups(batch, hidden.device), settings,
                               CrossSettings("alm"), None, vocab_width=width, chunk_size=5)
    assert got.distill.item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert got.total.item() == pytest.approx(0.5 * ce.item() + 0.5 * by_hand.item(), rel=1e-4)


def test_alm_group_likelihood_is_the_product_over_each_sides_own_tokens(tmp_path):
    """Different tokenizers: each group's teacher log-likelihood equals the sum of the teacher's log-probs of its
    own tokens of that group, and the groups' text is the same on both sides."""
    from nlm.distill.engines.aligned import group_tokens

    student_tok = build_tokenizer(CORPUS, vocab_size=290)
    teacher_tok = build_tokenizer(CORPUS, vocab_size=420)
    batch = _batch(tmp_path, student_tok, teacher_tok)
    teacher_model = build_causal_lm("llama", vocab_size=len(teacher_tok), hidden_size=48, num_layers=2, seed=3)
    teacher = AlignedTeacher(teacher_model, "cpu", len(teacher_tok), cross=CrossSettings("alm"))
    got = teacher.groups(batch, torch.device("cpu")).loglik
    with torch.no_grad():
        log_probs = torch.log_softmax(teacher_model(input_ids=batch["teacher_input_ids"],
                                                    attention_mask=batch["teacher_attention_mask"]).logits, -1)
    s_b, s_pos, s_group = group_tokens(batch["align_student"], batch["align_student_end"])
    t_b, t_pos, t_group = group_tokens(batch["align_teacher"], batch["align_teacher_end"])
    expected = torch.zeros_like(got)
    for b, pos, g in zip(t_b.tolist(), t_pos.tolist(), t_group.tolist(), strict=True):
        expected[g] += log_probs[b, pos - 1, batch["teacher_input_ids"][b, pos]]
    assert torch.allclose(got, expected, atol=1e-5)
    assert int(t_group.max()) + 1 == got.numel() > 5 and (torch.bincount(t_group) != torch.bincount(s_group)).any()
    for g in range(got.numel()):  # both sides spell the same text in every group
        s_ids = batch["input_ids"][s_b[s_group == g], s_pos[s_group == g]].tolist()
        t_ids = batch["teacher_input_ids"][t_b[t_group == g], t_pos[t_group == g]].tolist()
        assert student_tok.decode(s_ids) == teacher_tok.decode(t_ids)
