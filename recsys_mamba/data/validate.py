"""Type, schema and null checks; errors name the file, the column, the rows and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from recsys_mamba.data.readers import target_dtypes
from recsys_mamba.errors import RecsysError

_SHOW = 5


def required_columns(spec: dict[str, Any], has_timestamp: bool) -> list[str]:
    """Columns that must be non-null: ids, timestamps when the file has them, the label source."""
    cols = ["user_id", "item_id"]
    if has_timestamp:
        cols.append("timestamp")
    ctr = spec["ctr"]
    if ctr and ctr["label_from"] in ("rating", "event_type", "label"):
        cols.append(ctr["label_from"])
    return cols


def null_counts(df: pl.DataFrame, columns: list[str]) -> dict[str, int]:
    return {c: int(df[c].null_count()) for c in columns if df[c].null_count()}


def handle_nulls(lf: pl.LazyFrame, columns: list[str], counts: dict[str, int], policy: str, source: Path):
    """Drop rows with nulls in `columns` (policy 'drop') or raise naming the first rows ('error')."""
    if not counts:
        return lf
    if policy == "error":
        col, n = next(iter(counts.items()))
        rows = lf.filter(pl.col(col).is_null()).select(pl.col("_row") + 1).head(_SHOW).collect().to_series()
        raise RecsysError(
            f"{source}: column {col!r} is empty in {n} rows (data rows {rows.to_list()}, 1-based, header not "
            "counted); fill them in, or drop such rows with data.on_null=drop "
            "(they are counted in the manifest)"
        )
    return lf.filter(pl.all_horizontal(pl.col(c).is_not_null() for c in columns))


def diagnose(strings_lf: pl.LazyFrame, spec: dict[str, Any], source: Path, cause: Exception) -> RecsysError:
    """Explain a failed typed read: find the values that do not parse as their declared type."""
    present = strings_lf.collect_schema().names()
    for col, dtype in target_dtypes(spec).items():
        if col not in present or not (dtype.is_numeric()):
            continue
        probe = pl.col(col).str.strip_chars()
        parsed = (
            probe.cast(pl.Float64, strict=False)
            if dtype.is_float() or col == "timestamp"
            else probe.cast(dtype, strict=False)
        )
        bad = (
            strings_lf.filter(pl.col(col).is_not_null() & (probe != "") & parsed.is_null())
            .select("_line", col)
            .head(_SHOW)
            .collect()
        )
        if bad.height:
            kind = "integer" if dtype.is_integer() and col != "timestamp" else "number"
            unit = "row" if source.suffix in (".parquet", ".pq") else "line"
            shown = ", ".join(f"{unit} {line}: {value!r}" for line, value in bad.iter_rows())
            fix = (
                " Ids that are not numbers need data.id_type=str."
                if col in ("user_id", "item_id")
                else " Fix or remove those rows, or map another column with data.columns."
            )
            return RecsysError(f"{source}: column {col!r} must hold {kind}s but has {shown}.{fix}")
    return RecsysError(f"{source}: cannot be read as data.format={spec['format']!r}: {cause}")


def check_not_empty(n_rows: int, source: Path, after: str) -> None:
    if n_rows == 0:
        raise RecsysError(
            f"{source}: no events left after {after}; loosen that setting "
            "(data.filter, data.time_window, ...) "
            "or check the input file"
        )
