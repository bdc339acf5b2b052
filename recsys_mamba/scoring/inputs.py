"""Inputs: event logs or prepared folders to per-user histories in the model's item space; shards."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_mamba.data.format import ITEM_MAP, MANIFEST, SEQUENCES, USER_MAP, load_manifest
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


@dataclass(frozen=True)
class Input:
    """An input read lazily: a CSV, a Parquet file, a folder of Parquet files or a prepared folder.
    `rows` is exact for Parquet and prepared folders (their footers), else an estimate."""

    path: Path
    kind: str  # "csv" | "parquet" | "prepared"
    files: tuple[Path, ...]
    rows: int

    def scan(self) -> pl.LazyFrame:
        """The rows as stored (no checks, no conversion)."""
        if self.kind == "csv":
            # Every column as text: a guessed number type would turn id "007" into "7" (and ids beyond
            # int64 into floats); timestamps are parsed, and checked, by `_timestamp`.
            return pl.scan_csv(self.path, infer_schema=False)
        if self.kind == "prepared":
            return _prepared_scan(self.path)
        scans = [pl.scan_parquet(f) for f in self.files]
        return scans[0] if len(scans) == 1 else pl.concat(scans, how="diagonal_relaxed")

    def failed(self, err: BaseException) -> RecsysError:
        """`err`, raised while reading, as the error that names the input and what is wrong."""
        if isinstance(err, RecsysError):
            return err
        if self.kind == "csv":
            problem = text_problem(self.path, Layout(",", None, quoted=True))
            return RecsysError(f"input={self.path}: cannot be read as CSV: {problem or _first_line(err)}")
        if self.kind == "prepared":
            return RecsysError(
                f"input={self.path}: a prepared folder with unreadable files ({_first_line(err)}); "
                "prepare it again"
            )
        if len(self.files) > 1 and isinstance(err, pl.exceptions.SchemaError):
            return RecsysError(
                f"input={self.path}: its .parquet files have clashing column types ({_first_line(err)}); "
                "give every part the same schema"
            )
        return RecsysError(f"input={self.path}: not a readable Parquet or .csv file ({_first_line(err)})")

    def collect(self, lf: pl.LazyFrame) -> pl.DataFrame:
        """`lf` (a query over this input) run by the streaming engine; read errors named."""
        try:
            return lf.collect(engine="streaming")
        except READ_ERRORS as err:
            raise self.failed(err) from None

    def schema(self) -> pl.Schema:
        try:
            return self.scan().collect_schema()
        except READ_ERRORS as err:
            raise self.failed(err) from None


def _parquet_rows(files: tuple[Path, ...], path: Path) -> int:
    rows = 0
    for f in files:
        try:
            rows += int(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, pa.ArrowException) as err:
            raise RecsysError(
                f"input={path}: not a readable Parquet or .csv file ({_first_line(err)})"
            ) from None
    return rows


def _csv_rows(path: Path) -> int:
    """Rows of a CSV, estimated from its first MiB (only the work is sized by it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    lines = max(head.count(b"\n"), 1)
    return max(1, lines * size // max(len(head), 1))


def open_input(path: str | Path, required: tuple[str, ...] = EVENT_COLUMNS) -> Input:
    """The input at `path`, with its `required` columns present and holding single values (a prepared
    folder is an event log). Nothing but footers and headers is read."""
    path = Path(path)
    if not path.exists():
        raise RecsysError(f"input={path} does not exist")
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = load_manifest(path)
        rows = int(manifest.get("n_interactions") or 0) or _parquet_rows((path / SEQUENCES,), path)
        inp = Input(path, "prepared", (path / SEQUENCES,), rows)
    elif path.is_dir():
        files = tuple(sorted(path.glob("*.parquet")))
        if not files:
            raise RecsysError(f"input={path} is a folder without .parquet files or a {MANIFEST}")
        inp = Input(path, "parquet", files, _parquet_rows(files, path))
    elif path.suffix == ".csv":
        inp = Input(path, "csv", (path,), _csv_rows(path))
    else:
        inp = Input(path, "parquet", (path,), _parquet_rows((path,), path))
    schema = inp.schema()
    missing = [c for c in required if c not in schema]
    if missing:
        raise RecsysError(f"input={path} lacks column(s) {missing}; it has {list(schema.names())}")
    for col in required:
        dtype = schema[col]
        if dtype.is_nested() or dtype == pl.Object:
            raise RecsysError(f"input={path}: column {col!r} holds {dtype} values, not numbers or text")
    return inp


def _rows(lf: pl.LazyFrame, mask: pl.Expr, inp: Input, *values: str) -> pl.DataFrame:
    """The first `_SHOW` rows where `mask` holds: `_r` (1-based row) and `values`."""
    found = lf.with_row_index("_r", offset=1).filter(mask).select("_r", *values).head(_SHOW)
    return inp.collect(found)


def _id_problem(dtype: pl.DataType, col: str) -> pl.Expr | None:
    """Where an id column of `dtype` holds what is no id: a float that is not a whole number."""
    if not dtype.is_float():
        return None
    c = pl.col(col)
    return c.is_not_null() & ~(c.is_finite() & (c == c.floor()) & (c.abs() < 2.0**63))


def _id(dtype: pl.DataType, col: str) -> pl.Expr:
    """`col` as strings; whole floats print as integers (1.0 -> "1") so they match the model's item map
    whatever number type the input has."""
    c = pl.col(col)
    return (c.cast(pl.Int64) if dtype.is_float() else c).cast(pl.String).alias(col)


def _timestamp(dtype: pl.DataType) -> pl.Expr:
    """`timestamp` as int64, null where it is not a whole number within int64 (text, a fraction, NaN,
    inf, empty): a guessed time would silently reorder the user's history."""
    col = pl.col("timestamp")
    if dtype.is_temporal():
        return col.cast(pl.Int64)
    if dtype == pl.String:
        return col.str.strip_chars().cast(pl.Int64, strict=False)
    if dtype.is_float():
        whole = col.is_finite() & (col == col.floor()) & (col.abs() < 2.0**63)
        return pl.when(whole).then(col).cast(pl.Int64, strict=False)
    if dtype.is_numeric() and not dtype.is_decimal():
        return col.cast(pl.Int64, strict=False)  # UInt64 above 2**63 - 1 becomes null
    return pl.lit(None, dtype=pl.Int64)


def check_values(inp: Input, id_columns: tuple[str, ...] = EVENT_COLUMNS, timestamps: bool = True) -> None:
    """One streaming pass over the input: no id is missing or a fraction, every timestamp is a whole
    number. The first problem is an error naming the column, how many rows and the first of them."""
    lf = inp.scan()
    schema = inp.schema()
    checks: dict[str, pl.Expr] = {f"null:{c}": pl.col(c).is_null().sum() for c in id_columns}
    for col in id_columns:
        bad = _id_problem(schema[col], col)
        if bad is not None:
            checks[f"fraction:{col}"] = bad.sum()
    if timestamps and "timestamp" in schema:
        checks["time"] = _timestamp(schema["timestamp"]).is_null().sum()
    counts = inp.collect(lf.select(**checks)).row(0, named=True)
    path = inp.path
    for col in id_columns:
        n = counts[f"null:{col}"]
        if n:
            rows = _rows(lf, pl.col(col).is_null(), inp)["_r"].to_list()
            raise RecsysError(
                f"input={path}: column {col!r} is empty in {n} rows (rows {rows}, 1-based); fill in or "
                "remove those rows"
            )
    for col in id_columns:
        if counts.get(f"fraction:{col}"):
            rows = _rows(lf, _id_problem(schema[col], col), inp)["_r"].to_list()
            raise RecsysError(
                f"input={path}: column {col!r} holds numbers that are not integers (rows {rows}, 1-based); "
                "ids must be integers or strings"
            )
    if counts.get("time"):
        bad = _rows(lf, _timestamp(schema["timestamp"]).is_null(), inp, "timestamp")
        raise RecsysError(
            f"input={path}: column 'timestamp' must hold whole numbers (unix time) but {counts['time']} rows "
            f"do not (rows {bad['_r'].to_list()}, 1-based: {bad['timestamp'].to_list()}); fix or remove "
            "them, or drop the column to use the file order"
        )


def events(inp: Input, start: int = 0, length: int | None = None) -> pl.LazyFrame:
    """Rows `start .. start + length` of an event input (checked by `check_values`) as user_id, item_id
    (strings), timestamp (the row number when the input has none), event_type (string or null) and
    `_row` (the row number in the whole input, 0-based): ties of time keep the file's order by it."""
    schema = inp.schema()
    lf = inp.scan()
    if inp.kind == "csv" or length is None:
        lf = lf.with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64))
        lf = lf if length is None else lf.slice(start, length)
    else:  # a Parquet slice reads only its row groups; its rows are numbered from `start`
        lf = (
            lf.slice(start, length).with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64) + start)
        )
    event_type = (
        _id(schema["event_type"], "event_type") if "event_type" in schema else pl.lit(None, dtype=pl.String)
    )
    timestamp = _timestamp(schema["timestamp"]) if "timestamp" in schema else pl.col("_row")
    return lf.select(
        _id(schema["user_id"], "user_id"),
        _id(schema["item_id"], "item_id"),
        timestamp.alias("timestamp"),
        event_type.alias("event_type"),
        "_row",
    )


def pairs(inp: Input, start: int = 0, length: int | None = None) -> pl.LazyFrame:
    """(user_id, item_id) rows of a pairs input as strings, with `_row` (the file order)."""
    return events(inp, start, length).select("user_id", "item_id", "_row")


def read_table(path: str | Path, required: tuple[str, ...]) -> pl.DataFrame:
    """A Parquet file / folder of Parquet files, or a CSV, with at least the `required` columns,
    which must hold single values, none of them missing (in memory: for small inputs)."""
    inp = open_input(path, required)
    if inp.kind == "prepared":
        raise RecsysError(f"input={path} is a prepared folder; pass a Parquet or CSV table")
    check_values(inp, required, timestamps=False)
    return inp.collect(inp.scan())


def as_ids(df: pl.DataFrame, col: str, path: Path | str) -> pl.Series:
    """`col` as strings; whole floats print as integers (1.0 -> "1") so they match the model's item
    map whatever number type the input has; other floats are an error naming the rows."""
    bad = _id_problem(df.schema[col], col)
    if bad is not None:
        rows = df.with_row_index("_r", offset=1).filter(bad).head(_SHOW)["_r"].to_list()
        if rows:
            raise RecsysError(
                f"input={path}: column {col!r} holds numbers that are not integers (rows {rows}, 1-based); "
                "ids must be integers or strings"
            )
    try:
        return df.select(_id(df.schema[col], col)).to_series()
    except READ_ERRORS as err:
        raise RecsysError(f"input={path}: column {col!r} does not hold ids ({_first_line(err)})") from None


def _prepared_scan(folder: Path) -> pl.LazyFrame:
    """A prepared folder as an event log with original ids (time order kept by `timestamp`, the event's
    position in the folder's sequences)."""
    manifest = load_manifest(folder)
    names = [str(n) for n in manifest.get("event_types") or []]
    seq = pl.scan_parquet(folder / SEQUENCES).select("user_idx", "items", "event_types")
    items = pl.scan_parquet(folder / ITEM_MAP).select("item_idx", "item_id")
    users = pl.scan_parquet(folder / USER_MAP)
    events = (
        seq.explode(["items", "event_types"])
        .with_row_index("seq")
        .rename({"items": "item_idx"})
        .join(items, on="item_idx", how="left", maintain_order="left")
        .join(users, on="user_idx", how="left", maintain_order="left")
    )
    return events.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("seq").cast(pl.Int64).alias("timestamp"),
        pl.col("event_types")
        .fill_null(0)
        .replace_strict(list(range(len(names) + 1)), ["", *names], return_dtype=pl.String)
        .alias("event_type"),
    )


def prepared_events(folder: Path) -> pl.DataFrame:
    """A prepared folder as an event log with original ids (time order kept by `timestamp`)."""
    inp = open_input(folder)
    return inp.collect(inp.scan())


def read_events(path: str | Path) -> pl.DataFrame:
    """user_id, item_id (strings), timestamp, event_type; a file's own order breaks timestamp ties
    (in memory: for small inputs; the scoring job reads `events` partition by partition)."""
    inp = open_input(path)
    check_values(inp)
    return inp.collect(events(inp).drop("_row"))


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
