"""One FSDP2 training step of the fused loss on CPU processes (gloo), under torchrun: run by
tests/integration/test_fsdp.py and by `bench/gpu_check_sharded.py --smoke`.

accelerate enables FSDP only on accelerators (on the CPU it falls back to plain multi-process), so this script
wraps the student with PyTorch's `fully_shard` itself — as accelerate's FSDP2 plugin does: one unit per
decoder layer, then the root — and runs the fused path's own pieces: `capture_hidden`,
`sharded_head.gathered_head`, `fused_distillation_loss`. Rank 0 also computes the reference on one process
with full logits (the simple path) over the whole batch. Each rank writes OUT_DIR/rank<N>.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from nlm.distill.engines.fused import fused_distillation_loss
from nlm.distill.loss import LossSettings, distillation_loss
from nlm.distill.sharded_head import gathered_head
from nlm.distill.teacher import LiveTeacher
from nlm.models.heads import capture_hidden, output_head
from nlm.models.loading import load_causal_lm


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 12), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt tokens
    labels[1, 9:] = -100
    return ids, labels


def main(student_dir: str, teacher_dir: str, head_unit: str, gather: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    settings = LossSettings(alpha=0.5, temperature=2.0)
    teacher = LiveTeacher(load_causal_lm(teacher_dir, dtype=torch.float32), "cpu", 0)
    student = load_causal_lm(student_dir, dtype=torch.float32)
    teacher.vocab_width = student.config.vocab_size
    ids, labels = batch(student.config.vocab_size)
    shifted = labels[:, 1:]
    total_tokens = int((shifted != -100).sum())
    result: dict = {"rank": rank}

    if rank == 0:  # the reference: one process, the whole batch, full logits
        reference = load_causal_lm(student_dir, dtype=torch.float32)
        logits = reference(input_ids=ids, use_cache=False).logits[:, :-1][shifted != -100]
        rows = teacher.dense_rows({"input_ids": ids}, shifted != -100, logits.device)
        loss = distillation_loss(logits, rows, shifted[shifted != -100], alpha=0.5, temperature=2.0).total
        loss.backward()
        result["reference_loss"] = loss.item()
        result["reference_grad_norm"] = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters())).item()

    for layer in student.model.layers:
        fully_shard(layer)
    if head_unit == "own":
        fully_shard(student.lm_head)  # resharded right after its forward: the case gathered_head exists for
    fully_shard(student)

    local = slice(rank * 2, rank * 2 + 2)  # each process its half of the batch
    local_ids, local_labels = ids[local], shifted[local]
    mask = local_labels != -100
    head_module = output_head(student)
    with capture_hidden(student) as (store, head):
        student(input_ids=local_ids, use_cache=False)
    hidden = store["hidden"][:, :-1][mask]
    teacher_rows = teacher.row_source({"input_ids": local_ids}, mask, hidden.device)
    context = gathered_head(student, head_module) if gather == "yes" else torch.enable_grad()
    try:
        with context:
            parts = fused_distillation_loss(
                hidden, head, local_labels[mask], teacher_rows, vocab_width=student.config.vocab_size, settings=settings,
                normalizer=total_tokens, head_parameters=[p for p in head_module.parameters() if p.requires_grad],
                linear_head=(head_module.weight, head_module.bias) if type(head_module) is torch.nn.Linear else None,
            )
        # FSDP averages gradients over processes: scale so the sum over processes is the global mean.
        (parts.total * world).backward()
    except Exception as exc:  # noqa: BLE001 - reported to the test, which expects it without the gather
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
        return
    loss = parts.total.detach().clone()
    dist.all_reduce(loss)
    squares = torch.zeros(())
    for param in student.parameters():
        grad = param.grad
        squares += (grad.to_local() if hasattr(grad, "to_local") else grad).pow(2).sum()
    dist.all_reduce(squares)
    result.update(loss=loss.item(), grad_norm=squares.sqrt().item(),
                  head_is_sharded=type(student.lm_head.weight).__name__ == "DTensor")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
