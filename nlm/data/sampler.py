"""Which examples the student sees when: one seeded order for mixing, curricula and plain shuffling.

The order of an epoch is a pure function of (source sizes, weights, difficulty ranks, seed, epoch), so a
resumed run, `nlm data mix` and every process of a distributed run compute the same sequence. The trainer
only swaps its default sampler for `OrderSampler`; batching, sharding over processes and skipping the
batches already trained on resume stay the library's (Trainer + Accelerate).

Mixing is stratified rather than a coin toss per draw: an epoch of L draws takes round(w_s·L) examples from
source s (largest remainders), in a seeded shuffle of the source labels. Every prefix of the order therefore
follows the weights closely, and the epoch length does not depend on luck, which the Trainer needs (it
counts steps per epoch up front). `datasets.interleave_datasets` draws the source of each example
independently; its epoch length varies with the seed, so it cannot give the Trainer a fixed length.

Within a source, examples come in a fresh seeded permutation per pass. With a curriculum they come from the
easiest `pool(progress)` of the source instead (a prefix of its difficulty ranking that grows with training
progress, Hacohen & Weinshall 2019; Platanios et al. 2019), each pool example once before any repeats.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Sampler

from nlm.errors import ConfigError

STOPPING = ("first_exhausted", "all_exhausted")
PACINGS = ("linear", "step", "root")
STEP_COUNT = 4  # `step` pacing grows the pool in this many equal jumps


def pacing_fraction(progress: float, pacing: str, start_fraction: float, full_at: float) -> float:
    """Fraction of a source (easiest first) that may be sampled at `progress` ∈ [0, 1] of training."""
    if progress >= full_at:
        return 1.0
    t = max(progress, 0.0) / full_at
    if pacing == "linear":
        g = start_fraction + (1 - start_fraction) * t
    elif pacing == "root":  # Platanios et al.: sqrt(s0² + (1 - s0²)·t)
        g = math.sqrt(start_fraction**2 + (1 - start_fraction**2) * t)
    elif pacing == "step":
        g = start_fraction + (1 - start_fraction) * math.floor(t * STEP_COUNT) / STEP_COUNT
    else:
        raise ConfigError(f"curriculum.pacing = {pacing!r}: expected one of {', '.join(PACINGS)}")
    return min(1.0, g)


@dataclass(frozen=True)
class Pacing:
    pacing: str = "linear"
    start_fraction: float = 0.2
    full_at: float = 0.5


@dataclass
class OrderPlan:
    """Everything the order depends on. Indices are global: source s owns [offsets[s], offsets[s] + sizes[s])."""

    sizes: Sequence[int]
    weights: Sequence[float]
    names: Sequence[str]
    seed: int = 42
    stopping: str = "first_exhausted"
    size: int | None = None  # draws per epoch; overrides `stopping`
    # Per source, local example indices from easiest to hardest; None: no curriculum.
    ranking: Sequence[np.ndarray] | None = None
    pacing: Pacing = field(default_factory=Pacing)
    total_draws: int | None = None  # draws over the whole training, for curriculum progress

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.weights) or len(self.sizes) != len(self.names) or not self.sizes:
            raise ValueError("sizes, weights and names must be non-empty and of one length")
        if any(n <= 0 for n in self.sizes):
            empty = self.names[[n <= 0 for n in self.sizes].index(True)]
            raise ConfigError(f"train_mixture: source {empty!r} has no example")
        if any(not (w > 0 and math.isfinite(w)) for w in self.weights):
            raise ConfigError("train_mixture: every weight must be a positive number")
        if self.stopping not in STOPPING:
            raise ConfigError(f"mixture_stopping = {self.stopping!r}: expected one of {', '.join(STOPPING)}")
        total = float(sum(self.weights))
        self.probabilities = [w / total for w in self.weights]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    # -- lengths -----------------------------------------------------------------------------------------
    def epoch_length(self) -> int:
        """Draws per epoch: `size`, else until the first source is used up, else until all have been seen."""
        if self.size is not None:
            return int(self.size)
        ratios = [n / p for n, p in zip(self.sizes, self.probabilities, strict=True)]
        if len(self.sizes) == 1:
            return int(self.sizes[0])
        if self.stopping == "first_exhausted":
            return max(1, int(math.floor(min(ratios) + 1e-9)))
        return int(math.ceil(max(ratios) - 1e-9))

    def quotas(self, length: int) -> list[int]:
        """Draws per source in an epoch of `length`: round(p·length) by largest remainders (sums to length)."""
        exact = [p * length for p in self.probabilities]
        counts = [int(math.floor(x)) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda s: (-(exact[s] - counts[s]), s))
        for s in by_remainder[: length - sum(counts)]:
            counts[s] += 1
        return counts

    # -- the order ---------------------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def source_sequence(self, epoch: int) -> np.ndarray:
        """Which source each draw of the epoch comes from: [L] source ids."""
        length = self.epoch_length()
        labels = np.repeat(np.arange(len(self.sizes)), self.quotas(length))
        return self._rng(epoch, 1_000_003).permutation(labels)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global example indices of epoch `epoch`, in the order the trainer uses them: [L] int64."""
        sources = self.source_sequence(epoch)
        length = len(sources)
        order = np.empty(length, dtype=np.int64)
        for s in range(len(self.sizes)):
            positions = np.flatnonzero(sources == s)
            if not len(positions):
                continue
            if self.ranking is None:
                local = self._shuffled(s, epoch, len(positions))
            else:
                progress = (epoch * length + positions) / max(self.total_draws or length, 1)
                local = self._paced(s, epoch, progress)
            order[positions] = self.offsets[s] + local
        return order

    def _shuffled(self, s: int, epoch: int, count: int) -> np.ndarray:
        """`count` local indices: fresh permutations of the source, one after another (oversampling repeats)."""
        n = self.sizes[s]
        passes = [self._rng(epoch, s, cycle).permutation(n) for cycle in range(-(-count // n))]
        return np.concatenate(passes)[:count]

    def _paced(self, s: int, epoch: int, progress: np.ndarray) -> np.ndarray:
        """Local indices drawn from the growing easy pool: each pool example once before any repeats."""
        assert self.ranking is not None
        ranking, n = self.ranking[s], self.sizes[s]
        rng = self._rng(epoch, s, 7)
        # Written by hand: no library samples without replacement from a pool that grows between draws.
        available: list[int] = []  # ranks in the pool not yet drawn in this round
        admitted = 0  # ranks [0, admitted) have entered the pool
        out = np.empty(len(progress), dtype=np.int64)
        p = self.pacing
        for i, t in enumerate(progress):
            pool = max(1, min(n, int(math.ceil(pacing_fraction(float(t), p.pacing, p.start_fraction, p.full_at) * n - 1e-9))))
            if pool > admitted:
                available.extend(range(admitted, pool))
                admitted = pool
            if not available:
                available = list(range(admitted))
            j = int(rng.integers(len(available)))
            available[j], available[-1] = available[-1], available[j]
            out[i] = ranking[available.pop()]
        return out

    # -- accounting --------------------------------------------------------------------------------------
    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def drawn_counts(self, draws: int) -> dict[str, int]:
        """Examples drawn from each source in the first `draws` draws of training (over epochs)."""
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        length, epoch = self.epoch_length(), 0
        while draws > 0:
            take = min(draws, length)
            counts += np.bincount(self.source_sequence(epoch)[:take], minlength=len(self.sizes))
            draws -= take
            epoch += 1
        return {name: int(c) for name, c in zip(self.names, counts, strict=True)}


class OrderSampler(Sampler[int]):
    """A torch-style sampler over `OrderPlan.epoch_order(epoch)`; Accelerate calls `set_epoch` each epoch."""

    def __init__(self, plan: OrderPlan) -> None:
        self.plan = plan
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.plan.epoch_length()

    def __iter__(self) -> Iterator[int]:
        return iter(self.plan.epoch_order(self.epoch).tolist())
