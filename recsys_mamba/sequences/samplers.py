"""Batch samplers over the datasets of `sequences.datasets`."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from recsys_mamba.errors import RecsysError


class _Rows(Sized):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class LengthBucketBatchSampler(DistributedSampler):
    """Batches of rows with similar lengths, so little of each padded batch is padding; for one rank
    of `num_replicas` (one process: `num_replicas=1`).

    Each epoch the rows are shuffled as `DistributedSampler` shuffles them (seed + epoch) and padded,
    as it pads, with rows from the start to a multiple of `num_replicas`. The order is cut into pools
    of `pool_batches` steps, each pool is sorted by row length and cut into steps of `num_replicas x
    batch_size` rows, and the steps are shuffled. At every step each rank takes every
    `num_replicas`-th row of the step's rows, from its rank on: the ranks' batches are disjoint, of
    similar lengths (the same stretch of the sorted pool, so no rank waits on a longer one), of equal
    size, and every rank has the same number of them (DDP needs equal step counts). The order depends
    only on (seed, epoch), so a resumed run sees the same batches; with one rank the batches are the
    ones a one-process run had before DDP support.

    It yields whole batches: give it to a DataLoader as `sampler` with `batch_size=None` (it is a
    `DistributedSampler`, so Lightning neither replaces it nor wraps it, and calls `set_epoch`).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        pool_batches: int = 64,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise RecsysError(f"rank {rank} is not one of the {num_replicas} processes")
        super().__init__(_Rows(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.step_rows = self.batch_size * num_replicas
        self.pool = self.step_rows * int(pool_batches)

    def _order(self) -> np.ndarray:
        """The seeded global order, padded as DistributedSampler pads (drop_last=False)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        if order.size and self.total_size > order.size:
            order = np.concatenate([order, np.resize(order, self.total_size - order.size)])
        return order

    def steps(self) -> list[np.ndarray]:
        """Every step's rows (all ranks), in this epoch's order."""
        order = self._order()
        steps: list[np.ndarray] = []
        for lo in range(0, len(order), self.pool):
            pool = order[lo : lo + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            steps += [pool[i : i + self.step_rows] for i in range(0, len(pool), self.step_rows)]
        rng = np.random.default_rng([self.seed, self.epoch])
        return [steps[i] for i in rng.permutation(len(steps))]

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        for step in self.steps():
            yield step[self.rank :: self.num_replicas].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.total_size, self.pool)
        return full * (self.pool // self.step_rows) + -(-rest // self.step_rows)
