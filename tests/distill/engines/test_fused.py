"""The fused chunked loss equals the simple path: values and gradients, within 1e-5 in fp32."""

import pytest
import torch
from torch import nn

from nlm.distill.divergences import DIVERGENCES
from nlm.distill.engines.fused import dense_teacher_rows, fused_distillation_loss, sparse_teacher_rows
from nlm.distill.loss import LossSettings, SparseTargets, distillation_loss


def _setup(n=37, hidden=16, vocab=50, teacher_vocab=None, seed=0):
    torch.manual_seed(seed)
    student_hidden = torch.randn(n, hidden, requires_grad=True)
    head = nn.Linear(hidden, vocab, bias=True)
    teacher_hidden = torch.randn(n, 24)
    teacher_head = nn.Linear(24, teacher_vocab or vocab, bias=False).requires_grad_(False)
    targets = torch.randint(0, vocab, (n,))
    return student_hidden, head, teacher_hidden, teacher_head, targets


def _simple(student_hidden, head, teacher_hidden, teacher_head, targets, width, settings, normalizer=None):
    student_logits = head(student_hidden)[:, :width]
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)[:, :width]
    return distillation_loss(student_logits, teacher_logits, targets, alpha=settings.alpha, temperature=settings.temperature,
                             divergence=settings.divergence, normalizer=normalizer)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_equals_simple_values_and_gradients(divergence, alpha):
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup()
    settings = LossSettings(alpha=alpha, temperature=2.0, divergence=divergence)
    simple = _simple(student_hidden, head, teacher_hidden, teacher_head, targets, 50, settings)
    fused = fused_distillation_loss(student_hidden, head, targets, dense_teacher_rows(teacher_hidden, teacher_head, 50, torch.device("cpu")),
                                    vocab_width=50, settings=settings, chunk_size=8)
    torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.task, simple.task.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.distill, simple.distill.detach(), rtol=1e-5, atol=1e-5)
    params = [student_hidden, head.weight, head.bias]
    for a, b in zip(_grads(fused.total, params), _grads(simple.total, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_teacher_vocabulary_and_normalizer():
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup(vocab=50, teacher_vocab=64)
    settings = LossSettings()
    simple = _simple(student_hidden, head, teacher_hidden, teacher_head, targets, 50, settings, normalizer=100.0)
    fused = fused_distillation_loss(student_hidden, head, targets, dense_teacher_rows(teacher_hidden, teacher_head, 50, torch.device("cpu")),
                                    vocab_width=50, settings=settings, normalizer=100.0, chunk_size=5)
    torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(fused.total, [student_hidden, head.weight]), _grads(simple.total, [student_hidden, head.weight]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_get_both_gradients():
    torch.manual_seed(1)
    embedding = nn.Embedding(40, 12)
    head = nn.Linear(12, 40, bias=False)
    head.weight = embedding.weight  # tied, as in many small LMs
    ids = torch.randint(0, 40, (20,))
    targets = torch.randint(0, 40, (20,))
    teacher_logits = torch.randn(20, 40)
    settings = LossSettings()

    def run(fused):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(ids))
        if fused:
            loss = fused_distillation_loss(hidden, head, targets, lambda s, e: teacher_logits[s:e], vocab_width=40,
                                           settings=settings, chunk_size=6).total
        else:
            loss = distillation_loss(head(hidden), teacher_logits, targets).total
        loss.backward()
        return embedding.weight.grad.clone()

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_lora_adapter_on_the_head():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(16, 30)

    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    head = model.base_model.model.lm_head
    torch.manual_seed(2)
    hidden = torch.randn(25, 16, requires_grad=True)
    targets = torch.randint(0, 30, (25,))
    teacher_logits = torch.randn(25, 30)
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert len(trainable) == 2 and all("lora" in n for n, p in head.named_parameters() if p.requires_grad)
    fused = fused_distillation_loss(hidden, head, targets, lambda s, e: teacher_logits[s:e], vocab_width=30,
                                    settings=LossSettings(), chunk_size=4)
    simple = distillation_loss(head(hidden), teacher_logits, targets)
    torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(fused.total, [hidden, *trainable]), _grads(simple.total, [hidden, *trainable]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_cached_targets_match_the_simple_path(divergence):
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup()
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher_head(teacher_hidden) / 2.0, -1)
    top = teacher_logp.topk(8, dim=-1)
    from nlm.distill.loss import tail_logp

    sparse = SparseTargets(top.indices, top.values, tail_logp(top.values))
    settings = LossSettings(divergence=divergence)
    simple = distillation_loss(head(student_hidden), sparse, targets, divergence=divergence)
    fused = fused_distillation_loss(student_hidden, head, targets, sparse_teacher_rows(sparse), vocab_width=50,
                                    settings=settings, chunk_size=7)
    torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(fused.total, [student_hidden, head.weight]), _grads(simple.total, [student_hidden, head.weight]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sparse_with_all_tokens_kept_equals_dense():
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup(vocab=20)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)[:, :20]
        logp = torch.log_softmax(teacher_logits / 2.0, -1)
    top = logp.topk(19, dim=-1)  # all but one token: the tail bucket is exactly that token
    from nlm.distill.loss import tail_logp

    sparse = SparseTargets(top.indices, top.values, tail_logp(top.values))
    dense = distillation_loss(head(student_hidden)[:, :20], teacher_logits, targets, alpha=1.0)
    coarse = distillation_loss(head(student_hidden)[:, :20], sparse, targets, alpha=1.0)
    torch.testing.assert_close(coarse.total, dense.total, rtol=1e-4, atol=1e-5)


def test_no_grad_mode_and_empty_input():
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup()
    rows = dense_teacher_rows(teacher_hidden, teacher_head, 50, torch.device("cpu"))
    with torch.no_grad():
        parts = fused_distillation_loss(student_hidden, head, targets, rows, vocab_width=50, settings=LossSettings())
    assert torch.isfinite(parts.total) and not parts.total.requires_grad
    empty = fused_distillation_loss(student_hidden[:0], head, targets[:0], rows, vocab_width=50, settings=LossSettings())
    assert empty.tokens == 0 and empty.total.item() == 0


def test_generic_and_linear_head_paths_agree():
    """A callable head goes through autograd per chunk; a Linear head through hand-written gradients."""
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup(vocab=50, teacher_vocab=64)
    rows = dense_teacher_rows(teacher_hidden, teacher_head, 50, torch.device("cpu"))
    params = [student_hidden, head.weight, head.bias]
    linear = fused_distillation_loss(student_hidden, head, targets, rows, vocab_width=50, settings=LossSettings(), chunk_size=6)
    generic = fused_distillation_loss(student_hidden, lambda x: head(x), targets, rows, vocab_width=50, settings=LossSettings(),
                                      head_parameters=[head.weight, head.bias], chunk_size=6)
    torch.testing.assert_close(linear.total, generic.total)
    for a, b in zip(_grads(linear.total, params), _grads(generic.total, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_student_head_wider_than_the_vocabulary():
    """Padding rows of the student's own head get no gradient from either path."""
    torch.manual_seed(3)
    hidden = torch.randn(12, 8, requires_grad=True)
    head = nn.Linear(8, 40)  # 40 rows, 32 real tokens
    targets = torch.randint(0, 32, (12,))
    teacher_logits = torch.randn(12, 32)
    fused = fused_distillation_loss(hidden, head, targets, lambda s, e: teacher_logits[s:e], vocab_width=32, settings=LossSettings(),
                                    chunk_size=5)
    simple = distillation_loss(head(hidden)[:, :32], teacher_logits, targets)
    grads_fused = _grads(fused.total, [head.weight])[0]
    grads_simple = _grads(simple.total, [head.weight])[0]
    torch.testing.assert_close(grads_fused, grads_simple, rtol=1e-5, atol=1e-6)
    assert grads_fused[32:].abs().max() == 0


# --- mixed precision, chunk sizing, padded heads --------------------------------------------------------

def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("linear", [True, False])
def test_fused_under_bf16_autocast_matches_the_simple_path_under_autocast(linear):
    """The simple path's head matmul runs in bf16 inside the model's forward; the fused chunks must too."""
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup(n=64, hidden=32, vocab=300, seed=3)
    settings = LossSettings()
    with _bf16():
        student_logits = head(student_hidden)  # bf16, as under the Trainer's autocast
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    simple = distillation_loss(student_logits, teacher_logits, targets)
    call = head if linear else (lambda x: head(x))  # a non-Linear callable takes the autograd path
    fused = fused_distillation_loss(student_hidden, call, targets, lambda s, e: teacher_logits[s:e], vocab_width=300,
                                    settings=settings, chunk_size=16, autocast=_bf16,
                                    head_parameters=None if linear else [head.weight, head.bias])
    fp32 = fused_distillation_loss(student_hidden, head, targets, lambda s, e: teacher_logits[s:e], vocab_width=300,
                                   settings=settings, chunk_size=16)
    # bf16 keeps 8 bits of mantissa: the fused and simple bf16 losses agree to bf16 rounding of the logits,
    # and far better than either agrees with fp32.
    assert abs(fused.total.item() - simple.total.item()) < 1e-4
    assert abs(fp32.total.item() - simple.total.item()) > 10 * abs(fused.total.item() - simple.total.item())
    params = [student_hidden, head.weight, head.bias]
    for a, b in zip(_grads(fused.total, params), _grads(simple.total, params), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_chunk_size_depends_on_the_device_and_its_free_memory():
    from nlm.distill.engines.chunks import (
        DEFAULT_CHUNK_ELEMENTS,
        MAX_CHUNK_ELEMENTS,
        chunk_elements,
        chunk_rows,
    )

    assert chunk_elements("cpu") == DEFAULT_CHUNK_ELEMENTS == chunk_elements(None)
    assert chunk_rows(32_000, "cpu") == DEFAULT_CHUNK_ELEMENTS // 32_000
    assert chunk_elements("cuda", free_bytes=256 << 20) == DEFAULT_CHUNK_ELEMENTS  # little free memory: the floor
    assert chunk_elements("cuda", free_bytes=100 << 30) == MAX_CHUNK_ELEMENTS  # a large card: the cap
    middle = chunk_elements("cuda", free_bytes=4 << 30)
    assert DEFAULT_CHUNK_ELEMENTS < middle < MAX_CHUNK_ELEMENTS and middle * 4 * 6 * 8 <= 4 << 30


def _head_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_padded_heads_multiply_only_the_real_vocabulary_rows():
    from nlm.models.heads import sliced_head

    n, hidden, real, padded = 20, 16, 50, 64
    student_hidden, head, teacher_hidden, teacher_head, targets = _setup(n=n, hidden=hidden, vocab=padded, teacher_vocab=padded)
    targets = targets % real  # labels are real tokens
    settings = LossSettings()
    rows = dense_teacher_rows(teacher_hidden, sliced_head(teacher_head, real), real, torch.device("cpu"))
    torch.testing.assert_close(rows(0, n), teacher_head(teacher_hidden)[:, :real])
    assert _head_flops(lambda: rows(0, n)) == 2 * n * 24 * real  # not 2·n·24·64
    # The student's logits and hidden-state gradient, and the teacher's logits: each over the V real rows.
    # (The in-place weight-gradient addmm_ into grad[:V] is not seen by the counter; its rows are checked below.)
    flops = _head_flops(lambda: fused_distillation_loss(student_hidden, head, targets, rows, vocab_width=real,
                                                        settings=settings, chunk_size=7).total.backward())
    assert flops == 2 * n * real * (hidden + hidden + 24)
    simple = _simple(student_hidden, head, teacher_hidden, teacher_head, targets, real, settings)
    fused = fused_distillation_loss(student_hidden, head, targets, rows, vocab_width=real, settings=settings, chunk_size=7)
    torch.testing.assert_close(fused.total, simple.total, rtol=1e-5, atol=1e-6)
    assert head.weight.grad is not None and head.weight.grad[real:].abs().sum() == 0
