"""Datasets whose batches are built at once by `__getitems__` (use `collate_batch` with them).

- next_item, train: a user's training events shifted by one (input t predicts t + 1), so every prefix
  is trained; one row per user with the most recent `max_len` inputs, or with `windows` overlapping
  rows that together train every target (`NextItemTrainDataset`). With `positive_only`, events
  labelled 0 (skipped impressions) are inputs but never targets.
- next_item, valid / test: one row per user, the first event of that split is the target and every
  earlier event (train, and valid for test) the history (`NextItemEvalDataset`).
- ctr: one row per CTR sample; history = the user's most recent `max_len` events before it
  (`CTRDataset`); for training, samples grouped into shared history windows (`CTRWindowDataset`).

Rows are right-padded with 0 to the longest row of the batch.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from recsys_mamba.errors import RecsysError
from recsys_mamba.sequences.store import Batch, SequenceStore


class BatchDataset(Dataset):
    """A dataset whose batches are built at once by `__getitems__`; use with `collate_batch`."""

    def __init__(self, store: SequenceStore, max_len: int) -> None:
        self.store = store
        self.max_len = max_len

    def __getitem__(self, index: int | list[int]) -> Batch:
        # A list is a whole batch: what a sampler that yields batches gives a DataLoader with batch_size=None.
        return self.__getitems__(index if isinstance(index, list) else [index])

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        batch = self.build(idx)
        batch["index"] = torch.from_numpy(idx)
        return batch

    def build(self, idx: np.ndarray) -> Batch:
        raise NotImplementedError

    def lengths(self) -> np.ndarray:
        """Padded width each row needs (its history length), for length-bucketed batching."""
        raise NotImplementedError

    def rows_per_batch(self, batch_size: int) -> int:
        """Rows that make a batch of `batch_size` samples (fewer where rows share an encoded window)."""
        return batch_size

    def targets_per_row(self) -> float | None:
        """Mean loss targets per row where rows hold different numbers of them; None where every
        sample is one target (each batch then weighs its targets equally whatever its rows)."""
        return None


class NextItemTrainDataset(BatchDataset):
    """Training rows for next-click: inputs are a user's training events, targets the same shifted by one.

    Without `windows`, one row per user holds the most recent `max_len` inputs (the SASRec convention),
    so a user with more training events than that contributes only their last `max_len` targets.
    With `windows`, such a user gets overlapping rows ending every `max_len // 2` inputs back from the
    most recent one, and each target is trained in exactly one row: the one where it has the most
    context (at least `max_len - max_len // 2` earlier events, or all of them near the start). Every
    training target is then used, as when each prefix is its own sample, at about twice the encoder
    work for those users, where a sample per prefix would cost up to `max_len` times as much.
    """

    def __init__(
        self,
        store: SequenceStore,
        max_len: int,
        n_train: np.ndarray,
        positive_only: bool = True,
        windows: bool = False,
    ) -> None:
        super().__init__(store, max_len)
        self.positive_only = positive_only and "labels" in store.flat
        self.n_train = n_train
        users = np.flatnonzero(n_train >= 2)
        n_inputs = n_train[users] - 1
        stride = max(max_len // 2, 1)
        # Windows beyond the most recent one: ceil((n_inputs - max_len) / stride), 0 when all fit.
        n_older = np.maximum(0, -((max_len - n_inputs) // stride)) if windows else np.zeros_like(n_inputs)
        per_user = n_older + 1
        self.rows = np.repeat(users, per_user)
        back = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        end = np.repeat(n_inputs, per_user) - back * stride
        self.offset = np.maximum(0, end - max_len)  # first input of the row, within the user's sequence
        self.length = end - self.offset
        # A row that starts at the user's first event trains all its targets; a later window only its
        # last `stride`, since the row before it (one stride older) gives the others more context.
        older_exists = windows & (self.offset > 0)
        self.first_target = np.where(older_exists, self.length - stride, 0)

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return self.length

    def targets_per_row(self) -> float | None:
        if not len(self.rows):
            return None
        trained = self.length - self.first_target
        if not self.positive_only:
            return float(trained.mean())
        total, step = 0, max(1, 2**24 // max(self.max_len, 1))  # rows per chunk: bounded memory
        for lo in range(0, len(self.rows), step):
            part = slice(lo, lo + step)
            first = self.store.start[self.rows[part]] + self.offset[part] + 1 + self.first_target[part]
            labels = self.store.gather("labels", first, trained[part], max(int(trained[part].max()), 1))
            total += int((labels != 0).sum())  # gather pads with 0: padding is never counted
        return total / len(self.rows)

    def build(self, idx: np.ndarray) -> Batch:
        length = self.length[idx]
        start = self.store.start[self.rows[idx]] + self.offset[idx]
        batch = self.store.history(start, length)
        width = batch["items"].shape[1]
        trained = np.arange(width)[None, :] >= self.first_target[idx][:, None]
        if self.positive_only:
            # Skipped impressions (label 0) stay in the input history but are not targets to predict.
            trained &= self.store.gather("labels", start + 1, length, width).numpy() != 0
        targets = self.store.gather("items", start + 1, length, width)
        batch["targets"] = targets * torch.from_numpy(trained)
        return batch


class NextItemEvalDataset(BatchDataset):
    def __init__(self, store: SequenceStore, max_len: int, target_pos: np.ndarray) -> None:
        super().__init__(store, max_len)
        self.rows = np.flatnonzero(target_pos >= 1)
        self.target_pos = target_pos[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return np.minimum(self.target_pos, self.max_len)

    def build(self, idx: np.ndarray) -> Batch:
        rows = self.rows[idx]
        pos = self.target_pos[idx]
        length = np.minimum(pos, self.max_len)
        start = self.store.start[rows] + pos - length
        batch = self.store.history(start, length)
        batch["target"] = torch.from_numpy(self.store.values("items", self.store.start[rows] + pos))
        batch["users"] = torch.from_numpy(self.store.users[rows])
        # Every earlier item, not only the encoded window: the masked protocol removes the whole history.
        width = max(int(pos.max(initial=0)), 1)
        batch["history"] = self.store.gather("items", self.store.start[rows], pos, width)
        return batch


class CTRDataset(BatchDataset):
    def __init__(self, store: SequenceStore, max_len: int, samples: pl.DataFrame) -> None:
        super().__init__(store, max_len)
        self.frame = samples  # the ctr.parquet rows, as read
        self.users = samples["user_idx"].to_numpy().astype(np.int64)
        self.items = samples["item_idx"].to_numpy().astype(np.int64)
        self.categories = samples["category_idx"].fill_null(0).to_numpy().astype(np.int64)
        self.labels = samples["label"].to_numpy().astype(np.float32)
        self.hist_len = samples["hist_len"].to_numpy().astype(np.int64)
        rows = store.row_of_user[np.minimum(self.users, len(store.row_of_user) - 1)]
        if (rows < 0).any() or (self.hist_len > store.length[np.maximum(rows, 0)]).any():
            raise RecsysError(
                "ctr.parquet refers to users or history lengths missing from sequences.parquet; "
                "re-run the data preparation (python -m recsys_mamba.prepare ... overwrite=true)"
            )
        self.rows = rows

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.minimum(self.hist_len, self.max_len)

    def build(self, idx: np.ndarray) -> Batch:
        hist = self.hist_len[idx]
        length = np.minimum(hist, self.max_len)
        start = self.store.start[self.rows[idx]] + hist - length
        batch = self.store.history(start, length)
        batch["cand_items"] = torch.from_numpy(self.items[idx])
        batch["cand_categories"] = torch.from_numpy(self.categories[idx])
        batch["labels"] = torch.from_numpy(self.labels[idx])
        batch["users"] = torch.from_numpy(self.users[idx])
        return batch


class CTRWindowDataset(BatchDataset):
    """CTR training samples grouped by the stretch of history they need, each stretch encoded once.

    A causal encoder's output at position t depends only on events up to t, so all samples of a user
    whose history ends inside one window of `max_len` events share a single encoder pass. Windows
    start every `max_len // 2` events and a sample goes to the first window reaching its last
    history event, so it sees between `max_len // 2` and `max_len` events of context (all of them
    when the user has fewer). Rows are windows; `sample_window` maps each sample to its row and
    `sample_hist` is its history length inside that window.
    """

    def __init__(self, samples: CTRDataset) -> None:
        super().__init__(samples.store, samples.max_len)
        self.samples = samples
        stride = max(self.max_len // 2, 1)
        window = np.maximum(0, -((self.max_len - samples.hist_len) // stride))  # ceil((h - max_len) / stride)
        order = np.lexsort((samples.hist_len, window, samples.rows))
        key = np.stack([samples.rows[order], window[order]])
        change = np.flatnonzero(np.any(key[:, 1:] != key[:, :-1], axis=0)) + 1
        self.bounds = np.concatenate([[0], change, [len(order)]])
        self.order = order
        first = order[self.bounds[:-1]]
        self.win_row = samples.rows[first]
        self.win_start = window[first] * stride
        last = order[self.bounds[1:] - 1]
        self.win_len = samples.hist_len[last] - self.win_start

    def __len__(self) -> int:
        return len(self.win_row)

    def rows_per_batch(self, batch_size: int) -> int:
        return max(1, round(batch_size * len(self) / max(len(self.samples), 1)))

    def lengths(self) -> np.ndarray:
        return self.win_len

    def build(self, idx: np.ndarray) -> Batch:
        batch = self.store.history(
            self.store.start[self.win_row[idx]] + self.win_start[idx], self.win_len[idx]
        )
        counts = self.bounds[idx + 1] - self.bounds[idx]
        sample_window = np.repeat(np.arange(len(idx)), counts)
        picks = self.order[np.concatenate([np.arange(self.bounds[i], self.bounds[i + 1]) for i in idx])]
        s = self.samples
        batch["sample_window"] = torch.from_numpy(sample_window)
        batch["sample_hist"] = torch.from_numpy(s.hist_len[picks] - self.win_start[idx][sample_window])
        batch["cand_items"] = torch.from_numpy(s.items[picks])
        batch["cand_categories"] = torch.from_numpy(s.categories[picks])
        batch["labels"] = torch.from_numpy(s.labels[picks])
        batch["users"] = torch.from_numpy(s.users[picks])
        return batch


def collate_batch(batch: Batch) -> Batch:
    """The dataset already returns a whole batch (`__getitems__`)."""
    return batch
