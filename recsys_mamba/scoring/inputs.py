"""Inputs: event logs or prepared folders to per-user histories in the model's item space; shards."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import polars as pl

from recsys_mamba.data.format import MANIFEST, SEQUENCES, USER_MAP, load_manifest
from recsys_mamba.data.readers import Layout
from recsys_mamba.data.validate import READ_ERRORS, text_problem
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Kind
from recsys_mamba.sequences.prepared import PreparedData

EVENT_COLUMNS = ("user_id", "item_id")
_SHOW = 5
_SHARD = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")
MAX_SHARDS = 1 << 32  # user ids hash to crc32 values: more shards than that would all be empty


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_csv(path: Path) -> pl.DataFrame:
    """Every column as text: a guessed number type would turn id "007" into "7" (and ids beyond
    int64 into floats); timestamps are parsed, and checked, by `_timestamps`."""
    try:
        return pl.read_csv(path, infer_schema=False)
    except READ_ERRORS as err:
        problem = text_problem(path, Layout(",", None, quoted=True))
        detail = problem or _first_line(err)
        raise RecsysError(f"input={path}: cannot be read as CSV: {detail}") from None


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except READ_ERRORS as err:
        raise RecsysError(f"input={path}: not a readable Parquet or .csv file ({_first_line(err)})") from None


def _rows(df: pl.DataFrame, mask: pl.Expr) -> list[int]:
    return df.with_row_index("_r", offset=1).filter(mask).head(_SHOW)["_r"].to_list()


def _check_ids(df: pl.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    """Id columns must hold single values, none missing: a null user or item cannot be scored."""
    for col in columns:
        dtype = df.schema[col]
        if dtype.is_nested() or dtype == pl.Object:
            raise RecsysError(f"input={path}: column {col!r} holds {dtype} values, not numbers or text")
        nulls = df[col].null_count()
        if nulls:
            rows = _rows(df, pl.col(col).is_null())
            raise RecsysError(
                f"input={path}: column {col!r} is empty in {nulls} rows (rows {rows}, 1-based); fill in or "
                "remove those rows"
            )


def read_table(path: str | Path, required: tuple[str, ...]) -> pl.DataFrame:
    """A Parquet file / folder of Parquet files, or a CSV, with at least the `required` columns,
    which must hold single values, none of them missing."""
    path = Path(path)
    if not path.exists():
        raise RecsysError(f"input={path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise RecsysError(f"input={path} is a folder without .parquet files or a {MANIFEST}")
        frames = [_read_parquet(f) for f in files]
        try:
            df = pl.concat(frames, how="diagonal_relaxed")
        except READ_ERRORS as err:
            raise RecsysError(
                f"input={path}: its .parquet files have clashing column types ({_first_line(err)}); "
                "give every part the same schema"
            ) from None
    elif path.suffix == ".csv":
        df = _read_csv(path)
    else:
        df = _read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise RecsysError(f"input={path} lacks column(s) {missing}; it has {df.columns}")
    _check_ids(df, path, required)
    return df


def as_ids(df: pl.DataFrame, col: str, path: Path | str) -> pl.Series:
    """`col` as strings; whole floats print as integers (1.0 -> "1") so they match the model's item
    map whatever number type the input has; other floats are an error naming the rows."""
    s = df[col]
    if s.dtype.is_float():
        c = pl.col(col)
        bad = c.is_not_null() & ~(c.is_finite() & (c == c.floor()) & (c.abs() < 2.0**63))
        rows = _rows(df, bad)
        if rows:
            raise RecsysError(
                f"input={path}: column {col!r} holds numbers that are not integers (rows {rows}, 1-based); "
                "ids must be integers or strings"
            )
        s = s.cast(pl.Int64)
    try:
        return s.cast(pl.String)
    except READ_ERRORS as err:
        raise RecsysError(f"input={path}: column {col!r} does not hold ids ({_first_line(err)})") from None


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
    """`dtype` (the input's id type) when every id of `ids` (the text the job matches ids by)
    converts to it exactly, else text: one type for every part of a job."""
    ids = pl.Series(ids, dtype=pl.String)
    if dtype == pl.String:
        return dtype
    back = ids.cast(dtype, strict=False)
    exact = back.null_count() == ids.null_count() and (back.cast(pl.String) == ids).all()
    return dtype if exact else pl.String


def with_id_types(frame: pl.DataFrame, types: dict[str, pl.DataType]) -> pl.DataFrame:
    """`frame`'s id columns (text inside the job) as `types` says."""
    return frame.with_columns(pl.col(c).cast(t) for c, t in types.items() if c in frame.columns)


def _timestamps(df: pl.DataFrame, path: Path) -> pl.Series:
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
    out = df.select(parsed.alias("timestamp"), raw.alias("_raw")).with_row_index("_r", offset=1)
    bad = out.filter(pl.col("timestamp").is_null()).head(_SHOW)
    if bad.height:
        n = out["timestamp"].null_count()
        raise RecsysError(
            f"input={path}: column 'timestamp' must hold whole numbers (unix time) but {n} rows do not "
            f"(rows {bad['_r'].to_list()}, 1-based: {bad['_raw'].to_list()}); fix or remove them, or drop "
            "the column to use the file order"
        )
    return out["timestamp"]


def prepared_events(folder: Path) -> pl.DataFrame:
    """A prepared folder as an event log with original ids (time order kept by `seq`)."""
    manifest = load_manifest(folder)
    names = [str(n) for n in manifest.get("event_types") or []]
    try:
        seq = pl.read_parquet(folder / SEQUENCES, columns=["user_idx", "items", "event_types"])
        items = pl.read_parquet(folder / "item_map.parquet", columns=["item_idx", "item_id"])
        users = pl.read_parquet(folder / USER_MAP)
    except READ_ERRORS as err:
        raise RecsysError(
            f"input={folder}: a prepared folder with unreadable files ({_first_line(err)}); prepare it again"
        ) from None
    events = (
        seq.explode(["items", "event_types"])
        .with_row_index("seq")
        .rename({"items": "item_idx"})
        .join(items, on="item_idx", how="left")
        .join(users, on="user_idx", how="left")
    )
    return events.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("seq").alias("timestamp"),
        pl.col("event_types")
        .fill_null(0)
        .replace_strict(list(range(len(names) + 1)), ["", *names], return_dtype=pl.String)
        .alias("event_type"),
    )


def read_events(path: str | Path) -> pl.DataFrame:
    """user_id, item_id (strings), timestamp, event_type; a file's own order breaks timestamp ties."""
    return read_events_typed(path)[0]


def read_events_typed(path: str | Path) -> tuple[pl.DataFrame, dict[str, pl.DataType]]:
    """`read_events`, and the type each id column had in the input (`id_type`): what the scores
    give ids back as (a prepared folder stores them as text)."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return prepared_events(path), {c: pl.String for c in EVENT_COLUMNS}
    df = read_table(path, EVENT_COLUMNS)
    return _events(df, path), {c: id_type(df[c], path.suffix == ".csv") for c in EVENT_COLUMNS}


def _events(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    if "event_type" in df.columns:
        event_type = as_ids(df, "event_type", path)
    else:
        event_type = pl.Series("event_type", [None] * df.height, dtype=pl.String)
    return pl.DataFrame(
        [
            as_ids(df, "user_id", path),
            as_ids(df, "item_id", path),
            _timestamps(df, path),
            event_type.alias("event_type"),
        ]
    )


def to_model_space(data: PreparedData, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
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


def histories(data: PreparedData, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
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


def shard_mask(user_ids: pl.Series, shard: str) -> np.ndarray:
    """Rows whose user falls in `shard` "I/N": crc32 of the user id mod N == I (stable across runs)."""
    index, count = parse_shard(shard)
    if user_ids.null_count():
        raise RecsysError("user_id is empty in some rows; every row to score needs a user id")
    codes = np.fromiter((zlib.crc32(u.encode()) for u in user_ids.cast(pl.String)), np.int64, len(user_ids))
    return codes % count == index


class Shard(Kind):
    """ "I/N": this worker scores the users with crc32(user_id) % N == I."""

    def check(self, value: object, key: str) -> None:
        parse_shard(value, key)


def parse_shard(shard: str, key: str = "shard") -> tuple[int, int]:
    """ "I/N" (ASCII digits) with 0 <= I < N <= 2**32."""
    match = _SHARD.fullmatch(shard) if isinstance(shard, str) else None
    index, count = (int(match[1]), int(match[2])) if match else (-1, 0)
    if not 0 <= index < count <= MAX_SHARDS:
        raise RecsysError(f"{key}={shard!r} must be I/N with 0 <= I < N <= 2**32, e.g. {key}=0/4")
    return index, count
