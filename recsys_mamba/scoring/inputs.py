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
from recsys_mamba.runs import events
from recsys_mamba.runs.events import (  # noqa: F401 (the job's names for them)
    histories,
    id_type,
    output_type,
    to_model_space,
    with_id_types,
)
from recsys_mamba.schema import Kind

EVENT_COLUMNS = ("user_id", "item_id")
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


def source_kind(path: Path) -> str:
    """ "prepared" (a folder with a manifest), "csv", or "parquet" (a file or a folder of files); a
    clear error for a path that is not there."""
    if not path.exists():
        raise RecsysError(
            f"input={path} does not exist; give the path of an event log, pairs file or prepared folder"
        )
    if path.is_dir() and (path / MANIFEST).is_file():
        return "prepared"
    return "csv" if path.suffix == ".csv" else "parquet"


def parquet_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise RecsysError(f"input={folder} is a folder without .parquet files or a {MANIFEST}")
    return files


def read_table(path: str | Path, required: tuple[str, ...]) -> pl.DataFrame:
    """A Parquet file / folder of Parquet files, or a CSV, with at least the `required` columns,
    which must hold single values, none of them missing."""
    path = Path(path)
    if path.is_dir():
        frames = [_read_parquet(f) for f in parquet_files(path)]
        try:
            df = pl.concat(frames, how="diagonal_relaxed")
        except READ_ERRORS as err:
            raise RecsysError(
                f"input={path}: its .parquet files have clashing column types ({_first_line(err)}); "
                "give every part the same schema"
            ) from None
    elif source_kind(path) == "csv":
        df = _read_csv(path)
    else:
        df = _read_parquet(path)
    if tuple(required) != EVENT_COLUMNS:
        raise ValueError(f"read_table reads {EVENT_COLUMNS} tables, not {required}")
    events.check_id_columns(df, f"input={path}")
    return df


def as_ids(df: pl.DataFrame, col: str, path: Path | str) -> pl.Series:
    """`col` as strings (`runs.events.as_ids`), errors naming input=`path`."""
    return events.as_ids(df, col, f"input={path}")


def _event_columns(names: list[str]) -> list[pl.Expr]:
    """user_id, item_id, timestamp, event_type of exploded prepared sequences (in `seq` order)."""
    return [
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("seq").alias("timestamp"),
        pl.col("event_types")
        .fill_null(0)
        .replace_strict(list(range(len(names) + 1)), ["", *names], return_dtype=pl.String)
        .alias("event_type"),
    ]


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
    return events.select(_event_columns(names))


def prepared_scan(folder: Path) -> pl.LazyFrame:
    """`prepared_events` as a lazy frame whose `timestamp` is the position in the user's sequence
    (the same order per user, and a filter on user_id reads only those users' sequences)."""
    names = [str(n) for n in load_manifest(folder).get("event_types") or []]
    seq = pl.scan_parquet(folder / SEQUENCES).select("user_idx", "items", "event_types")
    users = pl.scan_parquet(folder / USER_MAP).with_columns(pl.col("user_id").cast(pl.String))
    items = pl.scan_parquet(folder / "item_map.parquet").select("item_idx", "item_id")
    return (
        users.join(seq, on="user_idx", how="inner")
        .with_columns(pl.int_ranges(pl.col("items").list.len()).alias("seq"))
        .explode(["items", "event_types", "seq"])
        .rename({"items": "item_idx"})
        .join(items, on="item_idx", how="left", maintain_order="left")
        .select(_event_columns(names))
    )


def read_events(path: str | Path) -> pl.DataFrame:
    """user_id, item_id (strings), timestamp, event_type; a file's own order breaks timestamp ties."""
    return read_events_typed(path)[0]


def read_events_typed(path: str | Path) -> tuple[pl.DataFrame, dict[str, pl.DataType]]:
    """`read_events`, and the type each id column had in the input (`id_type`): what the scores
    give ids back as (a prepared folder stores them as text)."""
    path = Path(path)
    if source_kind(path) == "prepared":
        return prepared_events(path), {c: pl.String for c in EVENT_COLUMNS}
    df = read_table(path, EVENT_COLUMNS)
    types = {c: events.id_type(df[c], path.suffix == ".csv") for c in EVENT_COLUMNS}
    return events.event_frame(df, f"input={path}"), types


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
