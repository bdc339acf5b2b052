"""Every user's event sequence as flat arrays with per-user offsets, so a batch is cut out of them in
one vectorised step with no per-sample Python work."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recsys_mamba.errors import RecsysError

SPLITS = {"train": 0, "valid": 1, "test": 2}
SIDE_INPUTS = ("categories", "event_types")  # per-event inputs an encoder may embed beside the item
Batch = dict[str, torch.Tensor]


class SequenceStore:
    """All users' event sequences as flat arrays; `start[row]`, `length[row]` index them."""

    def __init__(self, sequences: pl.DataFrame) -> None:
        sequences = sequences.sort("user_idx")
        lengths = sequences["items"].list.len().to_numpy().astype(np.int64)
        self.users = sequences["user_idx"].to_numpy().astype(np.int64)
        self.length = lengths
        self.start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.flat: dict[str, np.ndarray] = {}
        for name in ("items", *SIDE_INPUTS, "splits", "labels"):
            if name in sequences.columns:
                # An undefined click label (null) counts as a positive event: it is a real interaction.
                fill = 1 if name == "labels" else 0
                self.flat[name] = sequences[name].explode().fill_null(fill).to_numpy().astype(np.int64)
        if self.users.size and (self.users.min() < 0):
            raise RecsysError("sequences.parquet: user_idx must be >= 0")
        self.row_of_user = np.full(int(self.users.max(initial=0)) + 1, -1, dtype=np.int64)
        self.row_of_user[self.users] = np.arange(len(self.users))

    def split_positions(self) -> np.ndarray:
        """(n_users, 3): index within each user's sequence of the first train/valid/test event, or -1."""
        splits = self.flat["splits"]
        out = np.full((len(self.users), 3), -1, dtype=np.int64)
        row = np.repeat(np.arange(len(self.users)), self.length)
        pos = np.arange(splits.size) - np.repeat(self.start, self.length)
        for s in range(3):
            sel = splits == s
            # Sequences are chronological, so the first hit per row is the smallest position.
            first_rows, first_idx = np.unique(row[sel], return_index=True)
            out[first_rows, s] = pos[sel][first_idx]
        return out

    def training_lengths(self) -> np.ndarray:
        """Each user's number of training events: the prefix before their first valid (else test)
        event, the whole sequence for a user with neither."""
        first = self.split_positions()
        return np.where(first[:, 1] >= 0, first[:, 1], np.where(first[:, 2] >= 0, first[:, 2], self.length))

    def consecutive_pairs(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, next) item of every two consecutive events among the first `lengths[row]` events
        of each row (e.g. its training events)."""
        n_pairs = np.maximum(lengths - 1, 0)
        first = np.repeat(self.start, n_pairs)
        within = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
        at = first + within
        items = self.flat["items"]
        return items[at].astype(np.int64), items[at + 1].astype(np.int64)

    def gather(self, name: str, start: np.ndarray, length: np.ndarray, width: int) -> torch.Tensor:
        """Right-padded (B, width) rows flat[name][start : start + length]."""
        flat = self.flat[name]
        cols = np.arange(width)
        mask = cols[None, :] < length[:, None]
        idx = np.minimum(start[:, None] + cols[None, :], max(flat.size - 1, 0))
        return torch.from_numpy(np.where(mask, flat[idx] if flat.size else 0, 0))

    def history(self, start: np.ndarray, length: np.ndarray, min_width: int = 1) -> Batch:
        """The encoder's inputs for the events flat[start : start + length] of each row, right-padded."""
        width = max(int(length.max(initial=0)), min_width)
        out = {
            name: self.gather(name, start, length, width)
            for name in ("items", *SIDE_INPUTS)
            if name in self.flat
        }
        out["lengths"] = torch.from_numpy(length.copy())
        return out
