"""Item attributes (multi-valued side features): a file mapping item ids to attribute values becomes
`attribute_map.parquet` and `item_attributes.parquet` (the contract is in `recsys_mamba.data.format`).

Formats, chosen by the file's suffix:

- `.json`: one object `{"<item id>": [attribute, ...], ...}` (the S3-Rec `*_item2attributes.json`
  convention); attributes are integers or non-empty strings. A key given twice keeps both lists.
- `.csv`, `.tsv`, `.parquet` (`.pq`): a long table with columns `item_id` and `attribute`, one row per
  (item, attribute) pair; other columns are ignored.

Item ids are read as the events' ids are (`data.id_type`): with `id_type: int`, "0004", " 4" and 4 name
the same item. Attribute values are compared as strings: 1 in JSON and "1" in a CSV are one attribute.
Nothing is dropped without a count: ids that are not among the kept items and repeated (item,
attribute) pairs are counted in the manifest (`item_attributes`).
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_mamba.data import readers
from recsys_mamba.errors import RecsysError

KEY = "data.item_attributes"
SUFFIXES = (".json", ".csv", ".tsv", ".parquet", ".pq")
COLUMNS = ("item_id", "attribute")
_SHOW = 5
_SHAPE = '{"<item id>": [attribute, ...]}'
_TABLE = "a table with columns item_id and attribute, one row per (item, attribute) pair"
_READ_ERRORS = (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError)


def source(spec: dict[str, Any]) -> Path | None:
    """The attributes file of a normalized spec (None when it has none)."""
    value = spec["item_attributes"]
    return None if value is None else Path(value).expanduser()


def check_file(path: Path) -> None:
    if not path.is_file():
        kind = "is a folder, not a file" if path.is_dir() else "no such file"
        raise RecsysError(
            f"{KEY}={path}: {kind}; set {KEY}=/path/to/item2attributes.json (or {KEY}=null for none)"
        )


def read(path: Path, spec: dict[str, Any]) -> tuple[pl.Series, pl.DataFrame]:
    """The item ids the file names (every one, an item with an empty list too) and its (item,
    attribute) pairs in file order: `item_id` (the events' id dtype), `attribute` String, `_pos`."""
    check_file(path)
    if path.suffix.lower() == ".json":
        ids, pairs = _read_json(path)
        return _typed(ids.to_frame(), spec, path, None)["item_id"], _typed(pairs, spec, path, None)
    pairs = _read_table(path)
    pairs = _typed(pairs, spec, path, "row" if _is_parquet(path) else "data row")
    return pairs["item_id"], pairs


class _Object(list):
    """A JSON object as its (key, value) pairs, so a key given twice is kept, not overwritten."""


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, _Object):
        return "an object"
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _read_json(path: Path) -> tuple[pl.Series, pl.DataFrame]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f, object_pairs_hook=_Object)
    except UnicodeDecodeError as err:
        raise RecsysError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    except json.JSONDecodeError as err:
        raise RecsysError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {KEY} as .json "
            f"must hold one object {_SHAPE}"
        ) from None
    if not isinstance(data, _Object):
        raise RecsysError(
            f"{path}: the JSON is {_kind(data)}, not one object {_SHAPE}; write it as such, or convert it "
            f"to {_TABLE} (.csv/.tsv/.parquet)"
        )
    for key, value in data:
        if type(value) is not list:
            raise RecsysError(
                f"{path}: item {key!r} maps to {_kind(value)} ({json.dumps(value)[:60]}), not a list of "
                f'attributes; write it as "{key}": [attribute, ...] (an empty list for none)'
            )
        bad = [v for v in value if not _scalar(v)]
        if bad:
            raise RecsysError(
                f"{path}: item {key!r} has attribute {json.dumps(bad[0])[:60]} ({_kind(bad[0])}); "
                "attributes are integers or non-empty strings: fix or remove it"
            )
    keys = pl.Series("item_id", [key for key, _ in data], dtype=pl.String)
    lengths = np.fromiter((len(value) for _, value in data), dtype=np.int64, count=len(data))
    flat = chain.from_iterable(value for _, value in data)
    pairs = pl.DataFrame(
        {
            "item_id": keys.gather(np.repeat(np.arange(len(data)), lengths)),
            "attribute": pl.Series(list(flat), dtype=pl.String, strict=False),  # ints -> "1"
        }
    )
    return keys, pairs.with_row_index("_pos")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _read_table(path: Path) -> pl.DataFrame:
    kind = "Parquet" if _is_parquet(path) else path.suffix.lower().lstrip(".").upper()
    try:
        if _is_parquet(path):
            have = pl.scan_parquet(path).collect_schema().names()
            df = pl.read_parquet(path, columns=[c for c in COLUMNS if c in have])
        else:
            tsv = path.suffix.lower() == ".tsv"
            df = pl.read_csv(
                path, separator="\t" if tsv else ",", infer_schema=False, quote_char=None if tsv else '"'
            )
            df = df.rename({c: c.removeprefix("\ufeff") for c in df.columns})
            have = df.columns
    except pl.exceptions.NoDataError:
        raise RecsysError(f"{path}: the file is empty; {KEY} must be {_TABLE}") from None
    except _READ_ERRORS as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecsysError(
            f"{path}: cannot be read as a {kind} table ({first}); {KEY} must be {_TABLE}"
        ) from None
    missing = [c for c in COLUMNS if c not in have]
    if missing:
        raise RecsysError(
            f"{path}: missing columns {missing}; the file has {have[:10]}. {KEY} must be {_TABLE}: "
            "rename the columns in the file"
        )
    for col in COLUMNS:
        dtype = df.schema[col]
        numeric = dtype.is_integer() or (col == "item_id" and dtype.is_float())
        if not (numeric or dtype in (pl.String, pl.Null)):
            raise RecsysError(
                f"{path}: column {col!r} holds {dtype} values; item ids and attributes are integers or "
                "strings: store them as such"
            )
    return df.select(pl.col("item_id"), pl.col("attribute").cast(pl.String)).with_row_index("_pos")


def _where(df: pl.DataFrame, unit: str | None) -> str:
    """' (data row 3, data row 9)' for the first rows of `df` (by `_pos`); '' for JSON."""
    if unit is None:
        return ""
    return " (" + ", ".join(f"{unit} {p + 1}" for p in df["_pos"].head(_SHOW).to_list()) + ")"


def _typed(df: pl.DataFrame, spec: dict[str, Any], path: Path, unit: str | None) -> pl.DataFrame:
    """Check for empty values and cast `item_id` to the events' id dtype, as the event readers do."""
    if "_pos" not in df.columns:
        df = df.with_row_index("_pos")
    for col in (c for c in COLUMNS if c in df.columns):
        value = pl.col(col)
        empty = value.is_null() | ((value.str.strip_chars() == "") if df.schema[col] == pl.String else False)
        bad = df.filter(empty)
        if bad.height and unit is None:  # JSON: only a key can be empty here
            raise RecsysError(f'{path}: {bad.height} item ids are empty (""); give every item its id')
        if bad.height:
            raise RecsysError(
                f"{path}: column {col!r} is empty in {bad.height} rows{_where(bad, unit)}; every row needs "
                "an item id and an attribute: fill them in or remove those rows"
            )
    raw, target = df.schema["item_id"], readers.id_dtype(spec)
    col = pl.col("item_id")
    if target == pl.String:
        return df.with_columns(col.cast(pl.String))  # as the event readers cast
    if raw == pl.String:
        parsed = col.str.strip_chars().cast(pl.Int64, strict=False)
    elif raw.is_float():
        parsed = pl.when(col.is_finite() & (col == col.floor())).then(col).cast(pl.Int64, strict=False)
    else:
        parsed = col.cast(pl.Int64, strict=False)  # UInt64 beyond int64: null, refused below
    df = df.with_columns(parsed.alias("_id"))
    rows = df.filter(pl.col("_id").is_null())
    if rows.height:
        raise RecsysError(
            f"{path}: item ids must be integers (data.id_type=int, as in the events) but {rows.height} are "
            f"not: {rows['item_id'].head(_SHOW).to_list()}{_where(rows, unit)}. Ids that are not numbers "
            "need data.id_type=str."
        )
    return df.with_columns(pl.col("_id").alias("item_id")).drop("_id")


def build(
    ids: pl.Series, pairs: pl.DataFrame, item_map: pl.DataFrame, path: Path
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """`attribute_map`, `item_attributes` and the manifest's `item_attributes` entry.

    `item_map` has `item_idx` and the events' typed `item_id` (the kept items). Attribute indices
    1..n go to the attributes of kept items, by descending number of kept items carrying them, ties by
    the attribute string; each item's list keeps the file's first-seen order, repeats removed."""
    n_items = item_map.height
    first = pl.struct("item_id", "attribute").is_first_distinct()
    unique = pairs.lazy().filter(first)
    kept = unique.join(item_map.lazy(), on="item_id", how="inner").select("item_idx", "attribute", "_pos")
    attribute_map = (
        kept.group_by("attribute")
        .len("items")
        .sort(["items", "attribute"], descending=[True, False])
        .with_row_index("attribute_idx", offset=1)
        .select(pl.col("attribute_idx").cast(pl.Int32), "attribute")
        .collect()
    )
    lists = (
        kept.join(attribute_map.lazy(), on="attribute")
        .sort("item_idx", "_pos")
        .group_by("item_idx", maintain_order=True)
        .agg(pl.col("attribute_idx").alias("attributes"))
    )
    table = (
        item_map.lazy()
        .select("item_idx")
        .join(lists, on="item_idx", how="left")
        .sort("item_idx")
        .select(
            pl.col("item_idx").cast(pl.Int32),
            pl.col("attributes").fill_null(pl.lit([], dtype=pl.List(pl.Int32))).cast(pl.List(pl.Int32)),
        )
        .collect()
    )
    distinct = ids.unique().to_frame()
    unknown = distinct.join(item_map, on="item_id", how="anti")
    if attribute_map.height == 0:
        _nothing_matched(path, distinct.height, unknown, item_map)
    lengths = table["attributes"].list.len()
    with_attributes = int((lengths > 0).sum())
    info = {
        "path": str(path),
        "items_with_attributes": with_attributes,
        "items_without_attributes": n_items - with_attributes,
        "unknown_items": unknown.height,
        "duplicate_pairs": pairs.height - unique.select(pl.len()).collect().item(),
        "max_per_item": int(lengths.max() or 0),
    }
    return attribute_map, table, info


def _nothing_matched(path: Path, n_ids: int, unknown: pl.DataFrame, item_map: pl.DataFrame) -> None:
    if n_ids == 0:
        raise RecsysError(
            f"{path}: the file names no items; point {KEY} at a file with attributes, or set {KEY}=null"
        )
    if unknown.height < n_ids:
        raise RecsysError(
            f"{path}: none of the kept items has an attribute (their lists are empty); point {KEY} at a "
            f"file with attributes, or set {KEY}=null"
        )
    raise RecsysError(
        f"{path}: none of its {n_ids} item ids is among the {item_map.height} kept items (file ids e.g. "
        f"{unknown['item_id'].sort().head(3).to_list()}, event ids e.g. "
        f"{item_map['item_id'].head(3).to_list()}); the file must use the events' item ids (check "
        f"{KEY} and data.id_type)"
    )
