"""Cleaning and indexing steps: each one a plain function on LazyFrames of standard columns."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_mamba.errors import RecsysError

CHRONO = ["user_id", "timestamp", "_row"]


def positional_timestamps(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Timestamps for logs without times: the event's position in its user's file order."""
    return lf.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("timestamp"))


def chrono_sort(lf: pl.LazyFrame, keep_row: bool = True) -> pl.LazyFrame:
    """Stable chronological order per user: (user, timestamp), ties keep the file order (`_row`).

    Polars sorts one integer key several times faster than three columns, so with integer user ids
    the columns are packed into one UInt64 when their ranges fit. When the rows come in file order
    (`_row` ascending: a whole log, or a bucket of one), the tie-breaker is the row's position in the
    frame, so the sorted keys' low bits are the permutation itself and a plain sort of the keys
    (several times faster than an argsort) orders the frame. Otherwise (user, timestamp, `_row`) is
    sorted unstably (the key is unique), else (user, timestamp) stably; otherwise the three-column
    sort. The permutation is computed first and then gathered, which needs ~0.5 GB less at 20 M
    events than sorting the frame by an expression. `_row` is the position in the whole file, so in a
    bucket of the log its range, not the row count, sizes it. Without `keep_row`, `_row` is left
    out (not gathered only to be dropped)."""
    columns = pl.all() if keep_row else pl.exclude("_row")
    if lf.collect_schema()["user_id"].is_integer():
        b = lf.select(
            pl.col("user_id").min().alias("u0"),
            pl.col("user_id").max().alias("u1"),
            pl.col("timestamp").min().alias("t0"),
            pl.col("timestamp").max().alias("t1"),
            pl.col("_row").min().alias("r0"),
            pl.col("_row").max().alias("r1"),
            pl.len().alias("n"),
            (pl.col("_row") < pl.col("_row").shift(1)).any().alias("unordered"),
        ).collect()
        u0, u1, t0, t1, r0, r1, n, unordered = b.row(0)
        # ranges in Python ints: max - min of int64 ids or times near the limits overflows in int64
        if u0 is not None and t0 is not None and max(u1 - u0, t1 - t0) < 1 << 63:
            user_bits, time_bits, row_bits = (int(x).bit_length() for x in (u1 - u0, t1 - t0, r1 - r0))
            user = (pl.col("user_id") - pl.col("user_id").min()).cast(pl.UInt64)
            time = (pl.col("timestamp") - pl.col("timestamp").min()).cast(pl.UInt64)
            position_bits = int(n - 1).bit_length()
            if not unordered and user_bits + time_bits + position_bits <= 64:
                position = pl.int_range(pl.len(), dtype=pl.UInt64)
                key = (user * (1 << time_bits) + time) * (1 << position_bits) + position
                return _gather_by_low_bits(lf, key, position_bits, columns)
            if user_bits + time_bits + row_bits <= 64:
                row = (pl.col("_row") - pl.col("_row").min()).cast(pl.UInt64)
                key = (user * (1 << time_bits) + time) * (1 << row_bits) + row
                return _gather(lf, key.arg_sort(), columns)
            if user_bits + time_bits <= 64:
                order = pl.arg_sort_by(user * (1 << time_bits) + time, maintain_order=True)
                return _gather(lf, order, columns)
    return _gather(lf, pl.arg_sort_by(CHRONO), columns)


def _gather(lf: pl.LazyFrame, order: pl.Expr, columns: pl.Expr) -> pl.LazyFrame:
    permutation = lf.select(order).collect().to_series()
    return lf.select(columns.gather(permutation))


def _gather_by_low_bits(lf: pl.LazyFrame, key: pl.Expr, bits: int, columns: pl.Expr) -> pl.LazyFrame:
    """Gather the rows in the order of unique keys whose low `bits` are the row positions."""
    keys = np.sort(lf.select(key).collect().to_series().to_numpy())
    permutation = keys & np.uint64((1 << bits) - 1)
    return lf.select(columns.gather(pl.Series(permutation.astype(np.int64, copy=False))))


def deduplicate(lf: pl.LazyFrame, policy: str) -> pl.LazyFrame:
    """'keep' all; 'exact': drop repeats of (user, item, timestamp, event_type); 'first'/'last': keep the
    earliest/latest event of each (user, item). Expects chronological order."""
    if policy == "keep":
        return lf
    if policy == "exact":
        present = lf.collect_schema().names()
        key = [c for c in ("user_id", "item_id", "timestamp", "event_type") if c in present]
        return lf.filter(pl.struct(key).is_first_distinct())
    pair = pl.struct("user_id", "item_id")
    return lf.filter(pair.is_first_distinct() if policy == "first" else pair.is_last_distinct())


def time_window(lf: pl.LazyFrame, start: int | None, end: int | None) -> pl.LazyFrame:
    """Keep events with start <= timestamp < end (either bound may be None)."""
    cond = pl.lit(True)
    if start is not None:
        cond = cond & (pl.col("timestamp") >= start)
    if end is not None:
        cond = cond & (pl.col("timestamp") < end)
    return lf.filter(cond)


def rare_values(pairs: pl.LazyFrame, col: str, minimum: int) -> pl.Series:
    """Values of `col` with fewer than `minimum` rows (a group-by, much cheaper than a window)."""
    if minimum <= 1:
        return pl.Series(col, [])
    return pairs.group_by(col).len().filter(pl.col("len") < minimum).select(col).collect().to_series()


def kcore(
    lf: pl.LazyFrame, min_user: int, min_item: int, iterative: bool
) -> tuple[pl.LazyFrame, dict[str, int]]:
    """Drop items with < min_item events, then users with < min_user events; with `iterative`
    repeat until nothing changes (k-core). Returns the kept events and rows dropped per reason."""
    dropped = {"min_item": 0, "min_user": 0}
    if min_user <= 1 and min_item <= 1:
        return lf, dropped
    # counted straight from `lf`; the (user, item) pairs are only copied out once something drops
    pairs = lf.select("user_id", "item_id")
    gone_users, gone_items = [], []
    while True:
        changed = False
        for col, minimum, reason, gone in (
            ("item_id", min_item, "min_item", gone_items),
            ("user_id", min_user, "min_user", gone_users),
        ):
            rare = rare_values(pairs, col, minimum)
            if rare.len():
                before = pairs.select(pl.len()).collect().item()
                kept = pairs.filter(~pl.col(col).is_in(rare.implode())).collect().lazy()
                dropped[reason] += before - kept.select(pl.len()).collect().item()
                pairs, changed = kept, True
                gone.append(rare)
        if not iterative or not changed:
            break
    keep = pl.lit(True)
    if gone_users:
        keep = keep & ~pl.col("user_id").is_in(pl.concat(gone_users).implode())
    if gone_items:
        keep = keep & ~pl.col("item_id").is_in(pl.concat(gone_items).implode())
    return lf.filter(keep), dropped


def index_map(values: pl.Series, idx_name: str, value_name: str) -> pl.DataFrame:
    """Contiguous index 1..n over the sorted distinct values (0 stays free for padding)."""
    uniq = values.drop_nulls().unique().sort()
    return pl.DataFrame(
        {idx_name: pl.int_range(1, uniq.len() + 1, dtype=pl.Int32, eager=True), value_name: uniq}
    )


def user_index(lf: pl.LazyFrame) -> pl.LazyFrame:
    """`user_idx` for chronologically sorted events: users are numbered in sorted-id order, so a run
    counter over the sorted column equals a join with the user map, without the join."""
    new_user = pl.col("user_id") != pl.col("user_id").shift(1)
    return lf.with_columns(new_user.fill_null(True).cum_sum().cast(pl.Int32).alias("user_idx"))


_LOOKUP_LIMIT = 1 << 26


def lookup(col: str, lo: int, table: np.ndarray, below: int, above: int) -> pl.Expr:
    """`table[col - lo]` for integer values in [lo, lo + len(table)), `below` / `above` outside that
    range: one gather, no hashing or search per row. A null value gets `above`: callers that keep
    nulls apart test for them first."""
    hi = lo + len(table) - 1
    inside = pl.col(col).is_between(lo, hi)
    offset = pl.when(inside).then(pl.col(col) - lo).otherwise(0)  # gather must not see an index outside
    value = pl.lit(pl.Series(table)).gather(offset)
    return pl.when(inside).then(value).when(pl.col(col) < lo).then(below).otherwise(above)


def encode(lf: pl.LazyFrame, col: str, mapping: pl.DataFrame, idx_name: str) -> pl.LazyFrame:
    """Add `idx_name`, the index of `col` in `mapping` (columns idx_name, value); unknown/null -> 0.

    Integer values in a compact range use a lookup table (one gather, no hashing)."""
    values, idx = (
        mapping.get_column(next(c for c in mapping.columns if c != idx_name)),
        mapping.get_column(idx_name),
    )
    if values.dtype.is_integer() and values.len() and values.max() - values.min() < _LOOKUP_LIMIT:
        lo, hi = values.min(), values.max()
        table = np.zeros(hi - lo + 1, dtype=np.int32)
        table[(values - lo).to_numpy()] = idx.to_numpy()
        enc = lookup(col, lo, table, below=0, above=0)
    else:
        enc = pl.col(col).replace_strict(values, idx, default=0, return_dtype=pl.Int32)
    return lf.with_columns(enc.fill_null(0).cast(pl.Int32).alias(idx_name))


def encode_names(lf: pl.LazyFrame, col: str, names: list[str], idx_name: str) -> pl.LazyFrame:
    """Add `idx_name` = 1 + position of the string `col` in `names` (null -> 0). A categorical column
    is cast straight to the enum (through a string column it costs twice as much)."""
    enc = pl.col(col).cast(pl.Enum(names)).to_physical().cast(pl.Int32) + 1
    return lf.with_columns(enc.fill_null(0).alias(idx_name))


def event_type_names(present: pl.Series, declared: list[str] | None) -> list[str]:
    """Event type vocabulary: the declared order if given (every present type must be in it)."""
    names = sorted(present.drop_nulls().unique().to_list())
    if declared is None:
        return names
    unknown = sorted(set(names) - set(declared))
    if unknown:
        raise RecsysError(
            f"event types {unknown} occur in the data but are not in data.event_types={list(declared)}; "
            "add them to data.event_types"
        )
    return list(declared)


def click_labels(lf: pl.LazyFrame, ctr: dict | None) -> pl.LazyFrame:
    """`label` (Int8) from a rating threshold, from positive event types, or the file's label column."""
    if ctr is None or ctr["label_from"] == "none":
        return lf.with_columns(pl.lit(None, dtype=pl.Int8).alias("label"))
    if ctr["label_from"] == "rating":
        label = pl.col("rating") >= ctr["rating_threshold"]
    elif ctr["label_from"] == "event_type":
        if not ctr["positive_events"]:
            raise RecsysError("data config: ctr.label_from=event_type needs ctr.positive_events=[...]")
        label = pl.col("event_type").is_in(list(ctr["positive_events"]))
    else:
        label = pl.col("label") != 0
    return lf.with_columns(label.cast(pl.Int8).alias("label"))


def build_sequences(interactions: pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """One row per user with each column as a chronological list. `interactions` must be sorted by
    `user_idx`: each user's rows are then one slice, and the lists are zero-copy views of it."""
    runs = interactions.get_column("user_idx").rle()
    lengths = runs.struct.field("len").to_numpy()
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int64())
    lists = {
        dst: pa.LargeListArray.from_arrays(offsets, interactions.get_column(src).to_arrow())
        for dst, src in columns.items()
    }
    users = pl.DataFrame({"user_idx": runs.struct.field("value")})
    return users.with_columns(pl.from_arrow(pa.table(lists)).with_columns(pl.all().cast(pl.List)))
