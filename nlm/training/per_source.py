"""Per-source task loss for `log_per_source: true`: token-level CE of each mixture source in a batch.

The training loss is one number per batch; splitting it by source needs per-token figures, which the fused
loss does not keep. So this takes one extra no-grad pass over the batch's target rows (chunked like the
fused loss: one [chunk, V] logits tensor at a time). Its cost is an extra output-head product per step,
paid only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def per_source_sums(
    logits: Callable[[int, int], torch.Tensor], targets: torch.Tensor, token_source: torch.Tensor, num_sources: int,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE summed per source and target-token counts per source: ([S], [S]) on the targets' device.
    `logits(start, end)` gives the student's logits of target rows [start, end) as [c, V]."""
    sums = torch.zeros(num_sources, dtype=torch.float64, device=targets.device)
    for start in range(0, targets.numel(), chunk):
        end = min(start + chunk, targets.numel())
        ce = F.cross_entropy(logits(start, end).float(), targets[start:end], reduction="none")  # [c]
        sums.index_add_(0, token_source[start:end], ce.double())
    counts = torch.bincount(token_source, minlength=num_sources).to(torch.float64)
    return sums, counts
