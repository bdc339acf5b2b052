"""The prepared-data contract: what `prepare` writes and the training code reads.

A prepared folder (`out_dir`, default `${paths.cache_dir}/<name>-<config hash>`) holds:

`manifest.json`
    format_version, name, config (the resolved data config), config_hash, sources
    [{path, sha256, bytes, mtime_ns}], n_users, n_items, n_interactions, n_categories, n_event_types,
    event_types (names; index i+1 = name, 0 = none), has_timestamps, dropped {reason: rows},
    steps [{step, rows_in, rows_out}], split {kind: "loo"|"temporal", ...}, ctr (settings plus
    n_samples / n_positives, or null), n_attributes (0 without an attributes file), item_attributes
    (null, or {path, items_with_attributes, items_without_attributes, unknown_items: distinct item ids
    of the attributes file that are not among the kept items, duplicate_pairs: repeated (item,
    attribute) pairs of the file, removed, max_per_item}), files, package_version, created_at,
    prepare_seconds. With an attributes file, `sources` lists it after the event file, so a change to
    it makes the cache stale too.

`interactions.parquet`
    One row per kept event, sorted by (user_idx, timestamp, original file order):
    `user_idx` int32 (1..n_users), `item_idx` int32 (1..n_items), `timestamp` int64 (seconds; the
    position in the user's sequence when the source has none), `category_idx` int32 (0 = none),
    `event_type_idx` int32 (0 = none), `rating` float32 (nullable), `label` int8 (click label,
    null when undefined), `split` int8 (0 train, 1 valid, 2 test).

`sequences.parquet`
    One row per user, sorted by user_idx: `user_idx` int32 and the lists `items` list[int32],
    `timestamps` list[int64], `categories` list[int32], `event_types` list[int32], `labels`
    list[int8], `splits` list[int8], all in chronological order and of equal length.

`user_map.parquet` (`user_idx` int32, `user_id` original id as string), `item_map.parquet`
    (`item_idx` int32, `item_id` string, `category_idx` int32 = category of the item's first event,
    `count` int64 = training interactions), `category_map.parquet` (`category_idx`, `category`)
    when the source has categories. Index 0 is padding everywhere and never appears in a map.

`attribute_map.parquet`, `item_attributes.parquet` (only when the data config sets item_attributes)
    `attribute_map`: `attribute_idx` int32 (1..n_attributes), `attribute` string (the value in the
    file; integers as their decimal text). Only attributes of kept items get an index, numbered by
    descending number of kept items carrying them, ties by the attribute string (so the numbering is
    deterministic). `item_attributes`: one row per kept item sorted by `item_idx` (1..n_items, every
    item present), `attributes` list[int32] = that item's attribute indices in the order the file first
    gives them, repeats removed; an empty list for an item the file does not mention.
    `load_item_attributes` turns it into a zero-padded (n_items + 1, K) array.

`ctr.parquet` (only when the data config enables CTR samples)
    `user_idx`, `item_idx`, `category_idx` int32, `label` int8, `timestamp` int64, `hist_len` int32
    (that user's events in sequences.parquet before this sample: the history is items[:hist_len]),
    `split` int8 (the split of the event the sample belongs to), `sampled_negative` bool. With
    labels from ratings / event types / a label column every event is a sample at its own position;
    sampled negatives share the position, timestamp and split of the positive they were drawn for.

Every Parquet file is lz4-compressed in row groups of a fixed number of rows (131,072; sequences:
8,192 users), so its bytes depend only on its rows: the same for any number of buckets, either
engine and any Polars thread count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_mamba.errors import RecsysError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INTERACTIONS = "interactions.parquet"
SEQUENCES = "sequences.parquet"
USER_MAP = "user_map.parquet"
ITEM_MAP = "item_map.parquet"
CATEGORY_MAP = "category_map.parquet"
CTR = "ctr.parquet"
ITEM_ATTRIBUTES = "item_attributes.parquet"
ATTRIBUTE_MAP = "attribute_map.parquet"

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2

INTERACTIONS_SCHEMA: dict[str, pl.DataType] = {
    "user_idx": pl.Int32(),
    "item_idx": pl.Int32(),
    "timestamp": pl.Int64(),
    "category_idx": pl.Int32(),
    "event_type_idx": pl.Int32(),
    "rating": pl.Float32(),
    "label": pl.Int8(),
    "split": pl.Int8(),
}

# sequences.parquet list column -> the interactions column it collects
SEQUENCE_COLUMNS = {
    "items": "item_idx",
    "timestamps": "timestamp",
    "categories": "category_idx",
    "event_types": "event_type_idx",
    "labels": "label",
    "splits": "split",
}


def load_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of a prepared folder (or of the manifest file itself)."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise RecsysError(
            f"{file}: no prepared data here; run `python -m recsys_mamba.prepare data=NAME out_dir={path}`"
        ) from err
    except json.JSONDecodeError as err:
        raise RecsysError(
            f"{file}: manifest is not valid JSON ({err}); delete the folder and prepare again"
        ) from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RecsysError(
            f"{file}: prepared with format_version {manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; prepare the data again (overwrite=true)"
        )
    return manifest


def load_item_attributes(folder: Path | str) -> np.ndarray | None:
    """The attribute indices of every item as an int64 array of shape (n_items + 1, K), K = the most
    attributes any item has (at least 1): row i holds item i's indices (1..n_attributes) left-aligned
    and zero-padded, row 0 (padding) is all zeros. None when the folder has no attributes
    (manifest `n_attributes` 0 or absent)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    n_attributes = int(manifest.get("n_attributes") or 0)
    if n_attributes == 0:
        return None
    n_items = int(manifest["n_items"])
    file = folder / ITEM_ATTRIBUTES
    again = "run prepare again (overwrite=true)"
    if not file.is_file():
        raise RecsysError(
            f"{folder}: the manifest lists {n_attributes} item attributes but {ITEM_ATTRIBUTES} is missing; "
            f"{again}"
        )
    try:
        table = pl.read_parquet(file, columns=["item_idx", "attributes"])
    except (pl.exceptions.PolarsError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecsysError(f"{file}: not a readable item attribute table ({first}); {again}") from err
    items = table["item_idx"].to_numpy()
    if table.height != n_items or not np.array_equal(items, np.arange(1, n_items + 1)):
        raise RecsysError(
            f"{file}: holds {table.height} rows, not one per item 1..{n_items} in order as the manifest "
            f"says; {again}"
        )
    lengths = table["attributes"].list.len().fill_null(0).to_numpy().astype(np.int64)
    values = table["attributes"].explode().drop_nulls().to_numpy().astype(np.int64)
    if values.size != lengths.sum() or (values.size and (values.min() < 1 or values.max() > n_attributes)):
        raise RecsysError(
            f"{file}: attribute indices outside 1..{n_attributes} (the manifest's n_attributes); {again}"
        )
    out = np.zeros((n_items + 1, max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    rows = np.repeat(items.astype(np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(values.size) - np.repeat(starts, lengths)
    out[rows, cols] = values
    return out
