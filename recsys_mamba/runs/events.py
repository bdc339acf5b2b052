"""Event frames (from a file, or a user's polars or pandas frame) in the model's item space: the
shared input side of every inference path (the scoring job, the Python API, the service)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from recsys_mamba.data.validate import READ_ERRORS
from recsys_mamba.errors import RecsysError
from recsys_mamba.sequences.vocabulary import Vocabulary

_SHOW = 5  # rows named in an error message
EVENT_COLUMNS = ("user_id", "item_id")
# a frame read part by part (the streamed scoring job) carries each row's 1-based row of the whole
# input here, so an error names the rows of the file, not of the part
ROW = "_input_row"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _numbered(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with its 1-based input rows in column "_r": `ROW` where it has one, else its own order."""
    if ROW in df.columns:
        return df.with_columns(pl.col(ROW).alias("_r"))
    return df.with_row_index("_r", offset=1)


def _rows(df: pl.DataFrame, mask: pl.Expr) -> list[int]:
    return _numbered(df).filter(mask).head(_SHOW)["_r"].to_list()


def as_ids(df: pl.DataFrame, col: str, source: Path | str) -> pl.Series:
    """`col` as strings; whole floats print as integers (1.0 -> "1") so they match the model's item
    map whatever number type the input has; other floats are an error naming the rows."""
    s = df[col]
    if s.dtype.is_float():
        c = pl.col(col)
        bad = c.is_not_null() & ~(c.is_finite() & (c == c.floor()) & (c.abs() < 2.0**63))
        rows = _rows(df, bad)
        if rows:
            raise RecsysError(
                f"{source}: column {col!r} holds numbers that are not integers (rows {rows}, 1-based); "
                "ids must be integers or strings"
            )
        s = s.cast(pl.Int64)
    try:
        return s.cast(pl.String)
    except READ_ERRORS as err:
        raise RecsysError(f"{source}: column {col!r} does not hold ids ({_first_line(err)})") from None


# A CSV has no types: an id column comes back as integers when every value is written as one ("7",
# "-3"; not "007" or "+7", which would not read back the same), else as text.
_CANONICAL_INT = r"^-?(0|[1-9][0-9]{0,18})$"


def id_type(raw: pl.Series, text_file: bool = False) -> pl.DataType:
    """The type an input id column comes back as in the scores: an integer column keeps its type,
    whole floats (all `as_ids` accepts) come back as Int64, text as text; `text_file` (a CSV, read as
    text) infers integers as `_CANONICAL_INT` says."""
    dtype = raw.dtype
    if dtype.is_integer():
        return dtype
    if dtype.is_float():
        return pl.Int64
    if text_file and dtype == pl.String and len(raw) and raw.str.contains(_CANONICAL_INT).all():
        if raw.cast(pl.Int64, strict=False).null_count() == 0:
            return pl.Int64
    return pl.String


def output_type(ids: pl.Series | list[str], dtype: pl.DataType) -> pl.DataType:
    """`dtype` (the input's id type) when every id of `ids` (the text ids are matched by) converts to
    it exactly, else text: one type for every row of an answer (every part of a job)."""
    ids = pl.Series(ids, dtype=pl.String)
    if dtype == pl.String:
        return dtype
    back = ids.cast(dtype, strict=False)
    exact = back.null_count() == ids.null_count() and (back.cast(pl.String) == ids).all()
    return dtype if exact else pl.String


def with_id_types(frame: pl.DataFrame, types: dict[str, pl.DataType]) -> pl.DataFrame:
    """`frame`'s id columns (text inside the inference path) as `types` says."""
    return frame.with_columns(pl.col(c).cast(t) for c, t in types.items() if c in frame.columns)


def timestamps(df: pl.DataFrame, source: Path | str) -> pl.Series:
    """`timestamp` as int64 (the file order when absent); a value that is not a whole number within
    int64 (text, a fraction, NaN, inf, empty) is an error naming the rows: a guessed time would
    silently reorder the user's history."""
    if "timestamp" not in df.columns:
        return pl.int_range(df.height, dtype=pl.Int64, eager=True).alias("timestamp")
    raw = df["timestamp"]
    col = pl.col("timestamp")
    if raw.dtype.is_temporal():
        parsed = col.cast(pl.Int64)
    elif raw.dtype == pl.String:
        parsed = col.str.strip_chars().cast(pl.Int64, strict=False)
    elif raw.dtype.is_float():
        whole = col.is_finite() & (col == col.floor()) & (col.abs() < 2.0**63)
        parsed = pl.when(whole).then(col).cast(pl.Int64, strict=False)
    elif raw.dtype.is_numeric() and not raw.dtype.is_decimal():
        parsed = col.cast(pl.Int64, strict=False)  # UInt64 above 2**63 - 1 becomes null
    else:
        parsed = pl.lit(None, dtype=pl.Int64)
    out = _numbered(df).select(parsed.alias("timestamp"), raw.alias("_raw"), "_r")
    bad = out.filter(pl.col("timestamp").is_null()).head(_SHOW)
    if bad.height:
        n = out["timestamp"].null_count()
        raise RecsysError(
            f"{source}: column 'timestamp' must hold whole numbers (unix time) but {n} rows do not "
            f"(rows {bad['_r'].to_list()}, 1-based: {bad['_raw'].to_list()}); fix or remove them, or drop "
            "the column to use the file order"
        )
    return out["timestamp"]


def as_polars(df: Any, source: str | Path) -> pl.DataFrame:
    """`df` (a polars or pandas frame, a polars lazy frame, or a dict or list of rows) as a polars frame."""
    if isinstance(df, pl.DataFrame):
        return df
    if isinstance(df, pl.LazyFrame):
        return df.collect()
    if not isinstance(df, (dict, list)) and not type(df).__module__.startswith("pandas"):
        raise RecsysError(
            f"{source}: expected a polars or pandas DataFrame with columns user_id, item_id[, timestamp, "
            f"event_type], got {type(df).__name__}; read a file first, e.g. pl.read_parquet(path)"
        )
    try:
        return pl.from_pandas(df) if type(df).__module__.startswith("pandas") else pl.DataFrame(df)
    except (TypeError, ValueError, *READ_ERRORS) as err:
        raise RecsysError(
            f"{source}: expected a polars or pandas DataFrame with columns user_id, item_id[, timestamp, "
            f"event_type], got {type(df).__name__} ({_first_line(err)})"
        ) from None


def check_id_columns(df: pl.DataFrame, source: str | Path) -> None:
    """user_id and item_id present, each holding single values, none missing."""
    missing = [c for c in EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise RecsysError(
            f"{source} lacks column(s) {missing}; it has {df.columns}: give it columns user_id and item_id "
            "(rename yours, e.g. df.rename({'userId': 'user_id'}))"
        )
    for col in EVENT_COLUMNS:
        dtype = df.schema[col]
        if dtype.is_nested() or dtype == pl.Object:
            raise RecsysError(f"{source}: column {col!r} holds {dtype} values, not numbers or text")
        nulls = df[col].null_count()
        if nulls:
            rows = _rows(df, pl.col(col).is_null())
            raise RecsysError(
                f"{source}: column {col!r} is empty in {nulls} rows (rows {rows}, 1-based); fill in or "
                "remove those rows"
            )


def pair_frame(df: Any, source: str | Path) -> pl.DataFrame:
    """user_id, item_id (strings) from a polars or pandas frame with at least those columns."""
    df = as_polars(df, source)
    check_id_columns(df, source)
    return pl.DataFrame([as_ids(df, c, source) for c in EVENT_COLUMNS])


def event_frame(df: Any, source: str | Path) -> pl.DataFrame:
    """user_id, item_id (strings), timestamp (int64; the frame's order when absent), event_type
    (string or null) from a polars or pandas frame with at least user_id and item_id; `source` names
    it in errors."""
    df = as_polars(df, source)
    check_id_columns(df, source)
    if "event_type" in df.columns:
        event_type = as_ids(df, "event_type", source)
    else:
        event_type = pl.Series("event_type", [None] * df.height, dtype=pl.String)
    return pl.DataFrame(
        [
            as_ids(df, "user_id", source),
            as_ids(df, "item_id", source),
            timestamps(df, source),
            event_type.alias("event_type"),
        ]
    )


def unknown_items(data: Vocabulary | Any, events: pl.DataFrame) -> pl.Series:
    """The distinct item ids of `events` (strings) that the model does not know, in first-seen order."""
    ids = events["item_id"].unique(maintain_order=True)
    return ids.filter(~ids.is_in(list(data.items.index)))


def to_model_space(data: Vocabulary | Any, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Events with model indices (item, category, event type); unknown items dropped, and counted."""
    index = data.items.index
    item_map = pl.DataFrame(
        {"item_id": list(index), "item_idx": list(index.values())},
        schema={"item_id": pl.String, "item_idx": pl.Int64},
    )
    types = data.event_type_names
    type_map = pl.DataFrame(
        {"event_type": types, "event_type_idx": list(range(1, len(types) + 1))},
        schema={"event_type": pl.String, "event_type_idx": pl.Int64},
    )
    joined = events.join(item_map, on="item_id", how="left", maintain_order="left")
    unknown = int(joined["item_idx"].null_count())
    known = joined.drop_nulls("item_idx").join(type_map, on="event_type", how="left", maintain_order="left")
    category = pl.Series(data.items.categories)
    known = known.with_columns(
        pl.col("event_type_idx").fill_null(0),
        pl.col("item_idx")
        .map_batches(lambda s: category.gather(s), return_dtype=pl.Int64)
        .alias("category_idx"),
    )
    return known, unknown


def histories(data: Vocabulary | Any, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One row per user (sorted by user_id): lists items, categories, event_types in time order.

    Users whose events are all unknown items keep a row with empty lists (cold users).
    """
    users = events.select("user_id").unique()
    known, unknown = to_model_space(data, events)
    per_user = (
        known.sort(["user_id", "timestamp"], maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(
            pl.col("item_idx").alias("items"),
            pl.col("category_idx").alias("categories"),
            pl.col("event_type_idx").alias("event_types"),
        )
    )
    empty = pl.lit([], dtype=pl.List(pl.Int64))
    out = users.join(per_user, on="user_id", how="left").with_columns(
        pl.col(c).fill_null(empty) for c in ("items", "categories", "event_types")
    )
    return out.sort("user_id"), unknown


def with_users(users: pl.DataFrame, user_ids: pl.Series) -> pl.DataFrame:
    """The histories (`histories`) of exactly the users in `user_ids`, sorted: a user without any row in
    `users` gets empty lists (cold)."""
    wanted = user_ids.unique().to_frame("user_id")
    missing = wanted.join(users, on="user_id", how="anti")
    empty = pl.lit([], dtype=pl.List(pl.Int64))
    padded = missing.with_columns(**{c: empty for c in ("items", "categories", "event_types")})
    return pl.concat([users, padded]).join(wanted, on="user_id", how="semi").sort("user_id")
