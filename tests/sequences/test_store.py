"""The flat sequence store and the padding helpers every consumer shares."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recsys_mamba.sequences import SequenceStore, gather_last, last_positions, pad_right


def store() -> SequenceStore:
    # user 1: 1 2 3 | 4 (3 training events), user 2: 5 6 | 7 (2)
    return SequenceStore.from_frame(
        pl.DataFrame(
            {
                "user_idx": [2, 1],
                "items": [[5, 6, 7], [1, 2, 3, 4]],
                "splits": [[0, 0, 2], [0, 0, 0, 1]],
            }
        )
    )


def test_training_lengths_stop_at_the_first_valid_or_test_event() -> None:
    s = store()
    assert s.users.tolist() == [1, 2]  # rows sorted by user
    assert s.training_lengths().tolist() == [3, 2]


def test_consecutive_pairs_stay_within_each_users_prefix() -> None:
    s = store()
    src, dst = s.consecutive_pairs(s.training_lengths())
    assert list(zip(src.tolist(), dst.tolist(), strict=True)) == [(1, 2), (2, 3), (5, 6)]


def test_history_rows_are_right_padded_slices() -> None:
    s = store()
    batch = s.history(np.array([1, 4]), np.array([2, 3]))
    assert batch["items"].tolist() == [[2, 3, 0], [5, 6, 7]]
    assert batch["lengths"].tolist() == [2, 3]


def test_pad_right_keeps_the_most_recent_events_and_gather_last_finds_them() -> None:
    padded = pad_right(pl.Series([[1, 2, 3, 4], [5], []]), 3)
    assert padded.tolist() == [[2, 3, 4], [5, 0, 0], [0, 0, 0]]
    lengths = (padded != 0).sum(1)
    assert last_positions(lengths).tolist() == [2, 0, 0]
    hidden = torch.arange(9.0).reshape(3, 3, 1)
    assert gather_last(hidden, lengths)[:, 0].tolist() == [2.0, 3.0, 6.0]
