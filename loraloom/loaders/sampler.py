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
        self._plan: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def epoch_batches(self, epoch: int, rank: int | None = None) -> list[np.ndarray]:
        """Batches (arrays of record indices) of ``rank``'s share of ``epoch``, in training order."""
        ids, starts, ends = self._share(epoch, self.rank if rank is None else rank)
        return [ids[start:end] for start, end in zip(starts.tolist(), ends.tolist())]

    def _share(self, epoch: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record ids, batch starts, batch ends): batch k of ``rank``'s share is ids[starts[k]:ends[k]]."""
        if rank == self.rank and self._plan and self._plan[0] == epoch:
            return self._plan[1]
        ids, starts, ends = self._all_batches(epoch)
        share = (ids, starts[rank::self.world_size], ends[rank::self.world_size])
        if rank == self.rank:
            self._plan = (epoch, share)
        return share

    def _all_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self.repeats)
        counts = (whole + (rng.random(len(self.repeats)) < self.repeats - whole)).astype(np.int64)
        ids = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        ids = ids[np.argsort(self.buckets[ids], kind="stable")]  # grouped by bucket, shuffled within
        group_starts = np.flatnonzero(np.diff(self.buckets[ids], prepend=-1))
        group_ends = np.append(group_starts[1:], len(ids))[:len(group_starts)]  # none in an empty epoch
        # Each group cut into batch_size pieces (the last may be smaller), as arrays: a million records make
        # 250k batches, too many to slice one by one.
        pieces = -(-(group_ends - group_starts) // self.batch_size)
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = np.repeat(group_starts, pieces) + (np.arange(pieces.sum()) - first_piece) * self.batch_size
        ends = np.minimum(starts + self.batch_size, np.repeat(group_ends, pieces))
        order = rng.permutation(len(starts))
        return ids, starts[order], ends[order]

    def global_batch(self, position: SamplerPosition) -> int:
        """The number of ``position``'s batch among all ranks' batches of its epoch (rank r of w is dealt r,
        r + w, ...): what per-batch randomness is seeded with, so that ranks do not repeat each other's draws."""
        return position.batch * self.world_size + self.rank

    def next_batch(self, position: SamplerPosition) -> tuple[np.ndarray, SamplerPosition, SamplerPosition]:
        """(record indices, where they came from, the position after them)."""
        epoch, batch = position.epoch, position.batch
        for _ in range(1000):  # an epoch with no batch for this rank is possible with tiny fractional weights
            ids, starts, ends = self._share(epoch, self.rank)
            if batch < len(starts):
                return ids[starts[batch]:ends[batch]], SamplerPosition(epoch, batch), SamplerPosition(epoch, batch + 1)
            epoch, batch = epoch + 1, 0
        raise ValueError("1000 epochs in a row had no batch for this rank: raise the source weights or repeats")
