"""Inputs: event logs or prepared folders to per-user histories in the model's item space; shards."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import polars as pl

from recsys_mamba.data.format import MANIFEST, SEQUENCES, USER_MAP, load_manifest
from recsys_mamba.errors import RecsysError
from recsys_mamba.scoring.model import ScoringModel

EVENT_COLUMNS = ("user_id", "item_id")


def read_table(path: str | Path, required: tuple[str, ...]) -> pl.DataFrame:
    """A Parquet file / folder of Parquet files, or a CSV, with at least the `required` columns."""
    path = Path(path)
    if not path.exists():
        raise RecsysError(f"input={path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise RecsysError(f"input={path} is a folder without .parquet files or a {MANIFEST}")
        df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    elif path.suffix == ".csv":
        df = pl.read_csv(path, infer_schema_length=10_000)
    else:
        try:
            df = pl.read_parquet(path)
        except Exception as err:
            raise RecsysError(f"input={path}: not a Parquet or .csv file ({err})") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise RecsysError(f"input={path} lacks column(s) {missing}; it has {df.columns}")
    return df


def prepared_events(folder: Path) -> pl.DataFrame:
    """A prepared folder as an event log with original ids (time order kept by `seq`)."""
    manifest = load_manifest(folder)
    names = [str(n) for n in manifest.get("event_types") or []]
    seq = pl.read_parquet(folder / SEQUENCES, columns=["user_idx", "items", "event_types"])
    items = pl.read_parquet(folder / "item_map.parquet", columns=["item_idx", "item_id"])
    users = pl.read_parquet(folder / USER_MAP)
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
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return prepared_events(path)
    df = read_table(path, EVENT_COLUMNS)
    return df.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        (pl.col("timestamp") if "timestamp" in df.columns else pl.int_range(pl.len()))
        .cast(pl.Int64)
        .alias("timestamp"),
        (pl.col("event_type") if "event_type" in df.columns else pl.lit(None))
        .cast(pl.String)
        .alias("event_type"),
    )


def to_model_space(model: ScoringModel, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Events with model indices (item, category, event type); unknown items dropped, and counted."""
    item_map = pl.DataFrame(
        {"item_id": list(model.id_to_idx), "item_idx": list(model.id_to_idx.values())},
        schema={"item_id": pl.String, "item_idx": pl.Int64},
    )
    types = model.event_type_names
    type_map = pl.DataFrame(
        {"event_type": types, "event_type_idx": list(range(1, len(types) + 1))},
        schema={"event_type": pl.String, "event_type_idx": pl.Int64},
    )
    joined = events.join(item_map, on="item_id", how="left", maintain_order="left")
    unknown = int(joined["item_idx"].null_count())
    known = joined.drop_nulls("item_idx").join(type_map, on="event_type", how="left", maintain_order="left")
    category = pl.Series(model.item_category)
    known = known.with_columns(
        pl.col("event_type_idx").fill_null(0),
        pl.col("item_idx")
        .map_batches(lambda s: category.gather(s), return_dtype=pl.Int64)
        .alias("category_idx"),
    )
    return known, unknown


def histories(model: ScoringModel, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One row per user (sorted by user_id): lists items, categories, event_types in time order.

    Users whose events are all unknown items keep a row with empty lists (cold users).
    """
    users = events.select("user_id").unique()
    known, unknown = to_model_space(model, events)
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
    codes = np.fromiter((zlib.crc32(u.encode()) for u in user_ids.cast(pl.String)), np.int64, len(user_ids))
    return codes % count == index


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in str(shard).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise RecsysError(f"shard={shard!r} must be I/N with 0 <= I < N, e.g. shard=0/4")
    return index, count
