"""Train/valid/test assignment of chronologically sorted events (`split`: 0 train, 1 valid, 2 test)."""

from __future__ import annotations

import polars as pl

from recsys_mamba.data.format import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID
from recsys_mamba.errors import RecsysError


def leave_one_out(lf: pl.LazyFrame, anchor: str = "all", min_events: int = 3) -> pl.LazyFrame:
    """Per user: the last anchor event (and anything after it) -> test, the second-last anchor event
    (and anything up to the last) -> valid, the rest -> train. Anchors are all events, or with
    anchor='positive' the events labelled 1 (so CTR logs keep their skipped impressions in order).
    Users with fewer than `min_events` anchors stay entirely in train. Expects rows sorted by user."""
    if anchor == "all":
        return _leave_one_out_all(lf, max(min_events, 2))
    anchor_flag = (
        pl.lit(1, dtype=pl.Int32) if anchor == "all" else pl.col("label").fill_null(0).cast(pl.Int32)
    )
    lf = lf.with_columns(anchor_flag.alias("_anchor"))
    after = pl.col("_anchor").cum_sum(reverse=True).over("user_idx") - pl.col("_anchor")
    total = pl.col("_anchor").sum().over("user_idx")
    split = (
        pl.when(total < max(min_events, 2))
        .then(SPLIT_TRAIN)
        .when(after == 0)
        .then(SPLIT_TEST)
        .when(after == 1)
        .then(SPLIT_VALID)
        .otherwise(SPLIT_TRAIN)
    )
    return lf.with_columns(split.cast(pl.Int8).alias("split")).drop("_anchor")


def _leave_one_out_all(lf: pl.LazyFrame, min_events: int) -> pl.LazyFrame:
    """Every event is an anchor: neighbour comparisons on the sorted rows replace window functions."""
    user = pl.col("user_idx")

    def same_user(k: int) -> pl.Expr:  # the row k places earlier (k < 0: later) has the same user
        return (user.shift(k) == user).fill_null(False) if k else pl.lit(True)

    last = ~same_user(-1)
    second_last = same_user(-1) & ~same_user(-2)
    split = (
        pl.when(last & same_user(min_events - 1))
        .then(SPLIT_TEST)
        .when(second_last & same_user(min_events - 2))
        .then(SPLIT_VALID)
        .otherwise(SPLIT_TRAIN)
    )
    return lf.with_columns(split.cast(pl.Int8).alias("split"))


def temporal(lf: pl.LazyFrame, test_time: int, valid_time: int | None = None) -> pl.LazyFrame:
    """Global cut-off: timestamp >= test_time -> test, valid_time <= timestamp < test_time -> valid."""
    if valid_time is not None and valid_time > test_time:
        raise RecsysError(f"data config: split.valid_time={valid_time} is after split.test_time={test_time}")
    split = pl.when(pl.col("timestamp") >= test_time).then(SPLIT_TEST)
    if valid_time is not None:
        split = split.when(pl.col("timestamp") >= valid_time).then(SPLIT_VALID)
    return lf.with_columns(split.otherwise(SPLIT_TRAIN).cast(pl.Int8).alias("split"))


def assign(lf: pl.LazyFrame, split_cfg: dict, has_timestamps: bool) -> pl.LazyFrame:
    if split_cfg["kind"] == "loo":
        return leave_one_out(lf, split_cfg["anchor"], split_cfg["min_events"])
    if not has_timestamps:
        raise RecsysError(
            "data config: a temporal split needs real timestamps; this source has only an order"
        )
    return temporal(lf, split_cfg["test_time"], split_cfg["valid_time"])
