"""How often each item followed each other item in the training sequences: a sparse table that a
next-item head adds, with one learned weight, to the encoder's scores.

Short, sparse sequences (Amazon Beauty: 8.9 events per user) are dominated by item-to-item
transitions that a 64-wide embedding cannot memorise pair by pair; the table holds them exactly. The
feature is log(1 + count) of the pair (item just seen -> candidate). In training, the pair being
predicted is not counted (leave-one-out), so the weight learns what the table says about a pair it
has not been told, which is what it says about a test pair.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from recsys_mamba.errors import RecsysError


class TransitionTable(nn.Module):
    """Counts of (source item -> next item) pairs in CSR form: the successors of item a are
    `indices[indptr[a]:indptr[a + 1]]` (ascending) with `counts` beside them. Saved with the weights."""

    def __init__(
        self,
        n_items: int,
        sources: Tensor | np.ndarray,
        targets: Tensor | np.ndarray,
        persistent: bool = True,
    ) -> None:
        """persistent=False: the table is left out of the state dict (one rebuilt from what the
        weights already hold, e.g. the encoder's item attributes)."""
        super().__init__()
        src = torch.as_tensor(np.asarray(sources), dtype=torch.long).reshape(-1)
        dst = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        if src.shape != dst.shape:
            raise RecsysError(f"transition sources and targets differ in length: {len(src)} and {len(dst)}")
        both = torch.cat([src, dst])
        if len(both) and (int(both.min()) < 1 or int(both.max()) > n_items):
            raise RecsysError(f"transition items must lie in [1, {n_items}] (padding 0 is no item)")
        self.n_items = n_items
        keys, counts = torch.unique(src * (n_items + 1) + dst, return_counts=True)  # sorted: CSR order
        per_source = torch.bincount(keys // (n_items + 1), minlength=n_items + 1)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), per_source.cumsum(0)])
        self.register_buffer("indptr", indptr, persistent=persistent)
        self.register_buffer("keys", keys, persistent=persistent)
        self.register_buffer("counts", counts.float(), persistent=persistent)

    @classmethod
    def empty(cls, n_items: int, n_pairs: int) -> TransitionTable:
        """A table of the right shape to `load_state_dict` a saved one into."""
        table = cls(n_items, np.zeros(0, np.int64), np.zeros(0, np.int64))
        table.keys = torch.zeros(n_pairs, dtype=torch.long)
        table.counts = torch.zeros(n_pairs)
        return table

    @property
    def n_pairs(self) -> int:
        return int(self.keys.numel())

    def successors(self, items: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """For each source item (N,): its successors (N, K) and their log(1 + count) (N, K), 0-padded
        (item 0, value 0). `exclude` (N,): one occurrence of the pair (item, exclude) is not counted."""
        start, stop = self.indptr[items], self.indptr[items + 1]
        width = max(int((stop - start).max()) if items.numel() else 0, 1)
        offset = start[:, None] + torch.arange(width, device=items.device)
        real = offset < stop[:, None]
        at = offset.clamp(max=max(self.n_pairs - 1, 0))
        if self.n_pairs == 0:
            cols = torch.zeros_like(offset)
            counts = torch.zeros(offset.shape, device=items.device)
        else:
            cols = torch.where(real, self.keys[at] % (self.n_items + 1), 0)
            counts = torch.where(real, self.counts[at], 0.0)
        if exclude is not None:
            counts = counts - ((cols == exclude[:, None]) & real).float()
        return cols, counts.clamp(min=0).log1p()

    def values(self, items: Tensor, candidates: Tensor) -> Tensor:
        """log(1 + count) of (items[i] -> candidates[i, k]): items (N,), candidates (N, K) -> (N, K)."""
        if self.n_pairs == 0:
            return torch.zeros(candidates.shape, device=candidates.device)
        query = items[:, None] * (self.n_items + 1) + candidates
        at = torch.searchsorted(self.keys, query).clamp(max=self.n_pairs - 1)
        found = (self.keys[at] == query) & (candidates > 0)
        return torch.where(found, self.counts[at], 0.0).log1p()

    def dense(self, items: Tensor) -> Tensor:
        """(N, n_items + 1) log(1 + count) of every item after each of `items` (N,)."""
        cols, values = self.successors(items)
        out = torch.zeros(items.shape[0], self.n_items + 1, device=items.device)
        return out.scatter_add_(1, cols, values)  # padding slots add 0 to column 0
