"""The order of training batches: one bucket per batch, a seeded order per epoch, a share per rank.

Every epoch's plan is a pure function of (seed, epoch, rank, world size), so ranks agree without talking and
the position is two integers: restoring it recomputes one epoch's plan, never replays the batches before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerPosition:
    """JSON-friendly position: the next batch is number ``batch`` of this rank's share of ``epoch``."""
    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class BucketBatchSampler:
    """Batches of record indices; ``repeats[i]`` (float) is how often record i appears per epoch.

    A fractional repeat count is rounded up or down per epoch at random, so a source of weight 0.5 shows each
    image about every other epoch. Within an epoch each record appears ``count`` times, split into batches of
    one bucket each (the last batch of a bucket may be smaller); batches are shuffled and dealt round-robin,
    so rank r of w gets batches r, r + w, ...: together the ranks cover each appearance exactly once.
    """

    def __init__(self, buckets: np.ndarray, repeats: np.ndarray, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.buckets = np.asarray(buckets, np.int64)
        self.repeats = np.asarray(repeats, np.float64)
        if len(self.buckets) != len(self.repeats) or not (self.repeats > 0).any():
            raise ValueError("the sampler needs at least one record with a positive repeat count")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int, rank: int | None = None) -> list[np.ndarray]:
        """Batches (arrays of record indices) of ``rank``'s share of ``epoch``, in training order."""
        rank = self.rank if rank is None else rank
        if rank == self.rank and self._plan and self._plan[0] == epoch:
            return self._plan[1]
        batches = self._all_batches(epoch)[rank::self.world_size]
        if rank == self.rank:
            self._plan = (epoch, batches)
        return batches

    def _all_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self.repeats)
        counts = (whole + (rng.random(len(self.repeats)) < self.repeats - whole)).astype(np.int64)
        ids = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        ids = ids[np.argsort(self.buckets[ids], kind="stable")]  # grouped by bucket, shuffled within
        starts = np.flatnonzero(np.diff(self.buckets[ids], prepend=-1))
        ends = np.append(starts[1:], len(ids))
        batches = [ids[i:min(i + self.batch_size, end)]
                   for start, end in zip(starts, ends) for i in range(start, end, self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def next_batch(self, position: SamplerPosition) -> tuple[np.ndarray, SamplerPosition, SamplerPosition]:
        """(record indices, where they came from, the position after them)."""
        epoch, batch = position.epoch, position.batch
        for _ in range(1000):  # an epoch with no batch for this rank is possible with tiny fractional weights
            batches = self.epoch_batches(epoch)
            if batch < len(batches):
                return batches[batch], SamplerPosition(epoch, batch), SamplerPosition(epoch, batch + 1)
            epoch, batch = epoch + 1, 0
        raise ValueError("1000 epochs in a row had no batch for this rank: raise the source weights or repeats")
