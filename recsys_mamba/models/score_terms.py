"""What a next-item head adds to the encoder's scores besides the dot product, as sparse terms.

A scored row is a position in a user's sequence: in training every position of a training row, at
ranking the end of the user's history. `History` says what each scored row has seen up to there and
which item it has just seen; a head turns that into `ops.linear_ce.SparseScore` terms (a learned
scalar times values at a few columns per row), which the fused loss, ranking and pair scoring add
the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.ops.linear_ce import values_at

EARLIER = 3  # items before the current one that a History carries: a transition prior reaches that far back


def items_before(sequences: Tensor, rows: Tensor, positions: Tensor, depth: int = EARLIER) -> Tensor:
    """(N, depth) the items 1..depth events before position positions[i] of sequences[rows[i]], the
    most recent first, 0 where the sequence starts later."""
    at = positions[:, None] - torch.arange(1, depth + 1, device=positions.device)
    return torch.where(at >= 0, sequences[rows[:, None], at.clamp(min=0)], 0)


def first_occurrences(items: Tensor) -> Tensor:
    """items (B, L) with every occurrence of an id after its first in the row replaced by 0."""
    ordered, order = items.long().sort(dim=1, stable=True)  # equal ids stay in position order
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    kept = ordered.masked_fill(repeat, 0)
    return torch.empty_like(kept).scatter_(1, order, kept)


@dataclass(frozen=True)
class History:
    """What each scored row has seen: row i is position positions[i] of the right-padded sequence
    sequences[rows[i]], its current item (the one it has just seen) is current[i], the items just
    before it earlier[i] (most recent first, 0 where there are none; None: not known), and in
    training exclude[i] is the item it must predict, left out of its own transition count
    (leave-one-out).
    """

    sequences: Tensor
    rows: Tensor
    positions: Tensor
    current: Tensor
    exclude: Tensor | None = None
    earlier: Tensor | None = None

    @classmethod
    def causal(cls, items: Tensor, where: Tensor, targets: Tensor | None = None) -> History:
        """Rows for the positions where `where` (B, L) is True of the right-padded items (B, L);
        targets (B, L): what each position predicts."""
        rows, positions = where.nonzero(as_tuple=True)
        exclude = None if targets is None else targets[rows, positions]
        earlier = items_before(items, rows, positions)
        return cls(items, rows, positions, items[rows, positions], exclude, earlier)

    @classmethod
    def last(cls, items: Tensor, lengths: Tensor | None = None) -> History:
        """One row per sequence, at its last real position (what next-item ranking scores)."""
        lengths = (items != 0).sum(1) if lengths is None else lengths
        rows = torch.arange(items.shape[0], device=items.device)
        positions = (lengths.long() - 1).clamp(min=0)
        earlier = items_before(items, rows, positions)
        return cls(items, rows, positions, items[rows, positions], earlier=earlier)

    @functools.cached_property
    def firsts(self) -> Tensor:
        return first_occurrences(self.sequences)

    @property
    def n_rows(self) -> int:
        return int(self.rows.shape[0])

    def subset(self, keep: Tensor) -> History:
        exclude = None if self.exclude is None else self.exclude[keep]
        earlier = None if self.earlier is None else self.earlier[keep]
        rows, positions, current = self.rows[keep], self.positions[keep], self.current[keep]
        return History(self.sequences, rows, positions, current, exclude, earlier)

    def seen(self, start: int = 0, stop: int | None = None) -> Tensor:
        """(rows, L) ids of the items each row start:stop has seen, each once, 0 in the other slots."""
        part = slice(start, stop)
        upto = torch.arange(self.sequences.shape[1], device=self.rows.device) <= self.positions[part, None]
        return self.firsts[self.rows[part]] * upto


@dataclass(frozen=True)
class SeenColumns:
    """The items each row of `history` has already seen (value 1)."""

    history: History

    @property
    def n_rows(self) -> int:
        return self.history.n_rows

    def part(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, None]:
        return self.history.seen(start, stop), None

    def at(self, candidates: Tensor) -> Tensor:
        return values_at(self.history.seen(), None, candidates)


@dataclass(frozen=True)
class TransitionColumns:
    """The successors in `table` of the item `lag` events back in each row (1: its current item),
    valued log(1 + count). At lag 1 the pair (current, exclude) counts once less (leave-one-out in
    training); from further back the pair being predicted is not a consecutive pair of the sequence,
    so the table does not hold it from this row. leave_one_out=False: a table not counted from the
    training events (items sharing attributes), which holds nothing of the row to leave out."""

    table: TransitionTable
    history: History
    lag: int = 1
    leave_one_out: bool = True

    @property
    def n_rows(self) -> int:
        return self.history.n_rows

    @property
    def sources(self) -> Tensor:
        if self.lag == 1:
            return self.history.current
        if self.history.earlier is None or self.history.earlier.shape[1] < self.lag - 1:
            raise RecsysError(
                f"a transition prior from {self.lag} events back needs a History that carries the "
                f"{self.lag - 1} items before the current one (History.earlier)"
            )
        return self.history.earlier[:, self.lag - 2]

    @property
    def exclude(self) -> Tensor | None:
        return self.history.exclude if self.lag == 1 and self.leave_one_out else None

    def part(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
        rows = slice(start, stop)
        exclude = None if self.exclude is None else self.exclude[rows]
        return self.table.successors(self.sources[rows], exclude=exclude)

    def at(self, candidates: Tensor) -> Tensor:
        values = self.table.values(self.sources, candidates)
        if self.exclude is None:
            return values
        # log(1 + count - 1) where the candidate is the pair being predicted
        left_out = values.expm1().sub(1).clamp(min=0).log1p()
        return torch.where(candidates == self.exclude[:, None], left_out, values)
