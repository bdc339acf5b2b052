"""Batch samplers over the datasets of `sequences.datasets`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler, Sampler


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of rows with similar lengths, so little of each padded batch is padding.

    Each epoch the seeded `DistributedSampler` order is cut into pools of `pool_batches` batches, each
    pool is sorted by row length and cut into batches, and the batch order is shuffled. Like the plain
    sampler, the order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(
        self, sampler: DistributedSampler, lengths: np.ndarray, batch_size: int, pool_batches: int = 64
    ) -> None:
        self.sampler = sampler
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.pool = int(batch_size) * int(pool_batches)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        batches: list[list[int]] = []
        for lo in range(0, len(order), self.pool):
            pool = order[lo : lo + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        rng = np.random.default_rng([self.sampler.seed, self.sampler.epoch])
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.sampler)
        full, rest = divmod(n, self.pool)
        return full * -(-self.pool // self.batch_size) + -(-rest // self.batch_size)
