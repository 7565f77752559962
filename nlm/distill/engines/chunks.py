"""Chunk sizing and the chunk walk shared by both chunked engines (fused, aligned).

The two engines differ in how a chunk's gradient is obtained (by hand while the chunk's logits are alive,
`engines.fused`; or by recomputing the chunk in backward under activation checkpointing, `engines.aligned`),
not in how the rows are cut: both walk `spans(n, chunk_rows(V))`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements of one [chunk, V] logits tensor: 2**22 floats = 16 MiB; the chunk's handful of temporaries stay
# well under 100 MiB whatever the vocabulary. On a GPU a chunk may be larger (fewer, larger matmuls use the
# card better), bounded by free memory: MAX_CHUNK_ELEMENTS = 2**26 floats = 256 MiB per fp32 copy.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
MAX_CHUNK_ELEMENTS = 1 << 26
# fp32 copies of [chunk, V] alive at once in one chunk (student logits, log-softmax, probabilities, the
# teacher's, gradient), and the share of free memory one chunk may take.
_CHUNK_COPIES, _FREE_SHARE = 6, 8


def chunk_elements(device: torch.device | str | None = None, free_bytes: int | None = None) -> int:
    """Logits per chunk for `device`: the CPU default elsewhere; on CUDA, 1/8 of free memory split over a
    chunk's fp32 copies, between the default and MAX_CHUNK_ELEMENTS."""
    if free_bytes is None:
        if device is None or torch.device(device).type != "cuda":
            return DEFAULT_CHUNK_ELEMENTS
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    budget = free_bytes // _FREE_SHARE // (_CHUNK_COPIES * 4)
    return int(min(max(budget, DEFAULT_CHUNK_ELEMENTS), MAX_CHUNK_ELEMENTS))


def chunk_rows(vocab: int, device: torch.device | str | None = None) -> int:
    """Target rows per chunk for a vocabulary of `vocab` on `device`."""
    return max(8, chunk_elements(device) // max(vocab, 1))


def spans(count: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive chunks of at most `size` rows covering [0, count)."""
    for start in range(0, count, size):
        yield start, min(start + size, count)
