"""Every user's event sequence as flat arrays with per-user offsets, so a batch is cut out of them in
one vectorised step with no per-sample Python work.

The arrays are memory-mapped files next to the prepared folder (`recsys_mamba.sequences.mapped`):
per event `items`, `categories`, `event_types` (int32) and `splits`, `labels` (int8), each int64
instead where its values do not fit (`event_dtypes`); per user `users`, `start`, `length` and
`split_first` (int64). Every process of a run maps the same pages, and
a batch copies out only its rows, widened to int64, so memory does not grow with the data set.
`SequenceStore.from_frame` builds the same arrays in memory from a sequences frame (small data,
tests); both go through `flatten`, so they hold the same values.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl
import torch

from recsys_mamba.errors import RecsysError

SPLITS = {"train": 0, "valid": 1, "test": 2}
SIDE_INPUTS = ("categories", "event_types")  # per-event inputs an encoder may embed beside the item
Batch = dict[str, torch.Tensor]

# per-event arrays: sequences.parquet list column -> its dtype in the store where the values fit (the
# prepared Parquet's own width, so fitting is known from the schema), else int64
EVENT_ARRAYS: dict[str, np.dtype] = {
    "items": np.dtype(np.int32),
    "categories": np.dtype(np.int32),
    "event_types": np.dtype(np.int32),
    "splits": np.dtype(np.int8),
    "labels": np.dtype(np.int8),
}
# per-user arrays (row order = user_idx order); split_first is (n_users, 3)
USER_ARRAYS = ("users", "start", "length", "split_first")


def event_dtypes(sequences: pl.DataFrame | pl.LazyFrame) -> dict[str, np.dtype]:
    """Each per-event array's dtype in the store: its `EVENT_ARRAYS` type where every value fits, else
    int64. A column whose type is no wider fits by its type; any other is read once (streaming) for
    its smallest and largest value."""
    lf = sequences.lazy()
    schema = lf.collect_schema()
    out: dict[str, np.dtype] = {}
    bounds: list[pl.Expr] = []
    for name, narrow in EVENT_ARRAYS.items():
        if name not in schema:
            continue
        dtype = schema[name]
        inner = dtype.inner if isinstance(dtype, pl.List) else dtype
        if inner.is_integer() and np.can_cast(pl.Series([], dtype=inner).to_numpy().dtype, narrow):
            out[name] = narrow
        else:
            values = pl.col(name).explode()
            bounds += [values.min().alias(f"{name}.min"), values.max().alias(f"{name}.max")]
    if bounds:
        found = lf.select(bounds).collect(engine="streaming").row(0, named=True)
        for name, narrow in EVENT_ARRAYS.items():
            if f"{name}.min" in found:
                info = np.iinfo(narrow)
                lo, hi = (found[f"{name}.{b}"] for b in ("min", "max"))
                fits = (lo is None or lo >= info.min) and (hi is None or hi <= info.max)
                out[name] = narrow if fits else np.dtype(np.int64)
    return out


def flatten(
    sequences: pl.DataFrame, first_event: int = 0, dtypes: Mapping[str, np.dtype] | None = None
) -> dict[str, np.ndarray]:
    """The store's arrays for a frame of sequences.parquet rows sorted by user_idx, whose first event
    is event number `first_event` of the whole store (so `start` continues across frames); per-event
    arrays of `dtypes` (default: `event_dtypes` of this frame)."""
    dtypes = event_dtypes(sequences) if dtypes is None else dtypes
    lengths = sequences["items"].list.len().fill_null(0).to_numpy().astype(np.int64)
    out: dict[str, np.ndarray] = {
        "users": sequences["user_idx"].to_numpy().astype(np.int64),
        "length": lengths,
        "start": first_event + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
    }
    for name in EVENT_ARRAYS:
        if name in sequences.columns:
            # An undefined click label (null) counts as a positive event: it is a real interaction.
            fill = 1 if name == "labels" else 0
            values = sequences[name].explode(empty_as_null=False).fill_null(fill).to_numpy()
            out[name] = values.astype(dtypes[name], copy=False)
    out["split_first"] = _split_first(out["splits"], lengths) if "splits" in out else _no_splits(lengths)
    return out


def _split_first(splits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n_users, 3): position within each user's sequence of the first train/valid/test event, or -1."""
    out = np.full((len(lengths), 3), -1, dtype=np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(splits.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    for s in range(3):
        sel = splits == s
        # Sequences are chronological, so the first hit per row is the smallest position.
        first_rows, first_idx = np.unique(row[sel], return_index=True)
        out[first_rows, s] = pos[sel][first_idx]
    return out


def _no_splits(lengths: np.ndarray) -> np.ndarray:
    return np.full((len(lengths), 3), -1, dtype=np.int64)


class SequenceStore:
    """All users' event sequences as flat arrays; `start[row]`, `length[row]` index them."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.users = arrays["users"]
        self.start = arrays["start"]
        self.length = arrays["length"]
        self.first = arrays["split_first"]
        self.flat: dict[str, np.ndarray] = {n: arrays[n] for n in EVENT_ARRAYS if n in arrays}
        if self.users.size and int(self.users.min()) < 0:
            raise RecsysError("sequences.parquet: user_idx must be >= 0")
        self.row_of_user = np.full(int(self.users.max(initial=0)) + 1, -1, dtype=np.int64)
        self.row_of_user[self.users] = np.arange(len(self.users))

    @classmethod
    def from_frame(cls, sequences: pl.DataFrame) -> SequenceStore:
        """In memory, from sequences.parquet rows (any order)."""
        return cls(flatten(sequences.sort("user_idx")))

    @property
    def n_events(self) -> int:
        return int(self.flat["items"].size)

    def split_positions(self) -> np.ndarray:
        """(n_users, 3): index within each user's sequence of the first train/valid/test event, or -1."""
        return np.asarray(self.first, dtype=np.int64)

    def training_lengths(self) -> np.ndarray:
        """Each user's number of training events: the prefix before their first valid (else test)
        event, the whole sequence for a user with neither."""
        first = self.split_positions()
        length = np.asarray(self.length, dtype=np.int64)
        return np.where(first[:, 1] >= 0, first[:, 1], np.where(first[:, 2] >= 0, first[:, 2], length))

    def lengths_before_test(self) -> np.ndarray:
        """Each user's events before their first test event (training and validation events), the
        whole sequence for a user without one."""
        first_test = self.split_positions()[:, 2]
        return np.where(first_test >= 0, first_test, np.asarray(self.length, dtype=np.int64))

    def consecutive_pairs(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, next) item of every two consecutive events among the first `lengths[row]` events
        of each row (e.g. its training events)."""
        n_pairs = np.maximum(lengths - 1, 0)
        first = np.repeat(self.start, n_pairs)
        within = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
        at = first + within
        items = self.flat["items"]
        return items[at].astype(np.int64), items[at + 1].astype(np.int64)

    def values(self, name: str, at: np.ndarray) -> np.ndarray:
        """flat[name][at] as int64 (the store keeps narrower types on disk)."""
        return self.flat[name][at].astype(np.int64)

    def gather(self, name: str, start: np.ndarray, length: np.ndarray, width: int) -> torch.Tensor:
        """Right-padded (B, width) int64 rows flat[name][start : start + length]."""
        flat = self.flat[name]
        cols = np.arange(width)
        mask = cols[None, :] < length[:, None]
        idx = np.minimum(start[:, None] + cols[None, :], max(flat.size - 1, 0))
        rows = flat[idx].astype(np.int64) if flat.size else np.zeros(idx.shape, dtype=np.int64)
        return torch.from_numpy(np.where(mask, rows, 0))

    def history(self, start: np.ndarray, length: np.ndarray, min_width: int = 1) -> Batch:
        """The encoder's inputs for the events flat[start : start + length] of each row, right-padded."""
        width = max(int(length.max(initial=0)), min_width)
        out = {
            name: self.gather(name, start, length, width)
            for name in ("items", *SIDE_INPUTS)
            if name in self.flat
        }
        out["lengths"] = torch.from_numpy(np.asarray(length, dtype=np.int64).copy())
        return out
