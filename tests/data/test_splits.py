from __future__ import annotations

import polars as pl
import pytest

from recsys_mamba.data import splits
from recsys_mamba.errors import RecsysError


def _sorted(users, labels=None, times=None) -> pl.LazyFrame:
    data = {"user_idx": users, "timestamp": times or list(range(len(users)))}
    if labels is not None:
        data["label"] = labels
    return pl.LazyFrame(data)


def test_leave_one_out():
    lf = _sorted([1, 1, 1, 1, 2, 2, 3, 3, 3])
    out = splits.leave_one_out(lf).collect()["split"].to_list()
    assert out == [0, 0, 1, 2, 0, 0, 0, 1, 2]  # user 2 has < 3 events: all train


def test_leave_one_out_anchored_on_clicks():
    labels = [1, 0, 1, 0, 1, 0, 0]
    out = splits.leave_one_out(_sorted([1] * 7, labels), anchor="positive").collect()["split"].to_list()
    # last click and the skipped impressions after it -> test; from the second-last click -> valid
    assert out == [0, 0, 1, 1, 2, 2, 2]


def test_temporal_cutoffs():
    lf = _sorted([1, 1, 1, 2, 2], times=[1, 5, 9, 4, 10])
    assert splits.temporal(lf, test_time=9).collect()["split"].to_list() == [0, 0, 2, 0, 2]
    assert splits.temporal(lf, 9, valid_time=5).collect()["split"].to_list() == [0, 1, 2, 0, 2]
    with pytest.raises(RecsysError, match=r"after split\.test_time"):
        splits.temporal(lf, 5, valid_time=9)


def test_temporal_needs_timestamps():
    cfg = {"kind": "temporal", "test_time": 3, "valid_time": None}
    with pytest.raises(RecsysError, match="real timestamps"):
        splits.assign(_sorted([1]), cfg, has_timestamps=False)


@pytest.mark.parametrize("min_events", [2, 3, 4])
def test_leave_one_out_fast_path_matches_window_version(min_events):
    users = [1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 5, 5, 5, 5, 5]
    lf = _sorted(users, labels=[1] * len(users))
    fast = splits.leave_one_out(lf, "all", min_events).collect()["split"]
    windowed = splits.leave_one_out(lf, "positive", min_events).collect()["split"]
    assert fast.to_list() == windowed.to_list()
