"""Type, schema and null checks; errors name the file, the column, the rows and the fix."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from recsys_mamba.data.readers import Layout, float_source, layout, parsed_dtypes
from recsys_mamba.errors import RecsysError

_SHOW = 5
# what polars raises on input it cannot parse (a panic is not an Exception subclass)
READ_ERRORS = (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError)

# column -> (manifest drop reason, expression marking an invalid value, what the column must hold)
INVALID: dict[str, tuple[str, pl.Expr, str]] = {
    "rating": ("nonfinite_rating", ~pl.col("rating").is_finite(), "finite numbers (not NaN or inf)"),
    "timestamp": ("negative_timestamp", pl.col("timestamp") < 0, "unix times >= 0"),
    "label": ("invalid_label", ~pl.col("label").is_in([0, 1]), "click labels 0 or 1"),
}

StringsRead = Callable[[], pl.LazyFrame]


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


def where(rows: list[int], strings: StringsRead | None, source: Path) -> str:
    """'line 3, line 9' (or Parquet 'row ...') for `_row` values, from the string read's `_line`."""
    if strings is None:
        return ""
    try:
        found = strings().filter(pl.col("_row").is_in(rows)).select("_line").head(_SHOW).collect()
    except READ_ERRORS:
        return ""
    unit = "row" if source.suffix in (".parquet", ".pq") else "line"
    return ", ".join(f"{unit} {n}" for n in found["_line"].to_list())


def handle_nulls(
    lf: pl.LazyFrame,
    columns: list[str],
    counts: dict[str, int],
    policy: str,
    source: Path,
    strings: StringsRead | None = None,
) -> pl.LazyFrame:
    """Drop rows with nulls in `columns` (policy 'drop') or raise naming the first rows ('error')."""
    if not counts:
        return lf
    if policy == "error":
        col, n = next(iter(counts.items()))
        rows = lf.filter(pl.col(col).is_null()).select("_row").head(_SHOW).collect().to_series().to_list()
        raise null_error(col, n, rows, source, strings)
    return lf.filter(pl.all_horizontal(pl.col(c).is_not_null() for c in columns))


def null_error(col: str, n: int, rows: list[int], source: Path, strings: StringsRead | None) -> RecsysError:
    """The error for `n` empty values of `col`; `rows` are the first offending `_row`s (file order)."""
    lines = where(rows, strings, source)
    return RecsysError(
        f"{source}: column {col!r} is empty in {n} rows (data rows {[r + 1 for r in rows]}, 1-based, "
        f"header not counted{'; ' + lines if lines else ''}); fill them in, or drop such rows with "
        "data.on_null=drop (they are counted in the manifest)"
    )


def invalid_counts(df: pl.DataFrame, timed: bool) -> dict[str, int]:
    """Rows per column holding a value its column cannot mean (see INVALID); nulls are not counted."""
    counts = {}
    for col, (_, bad, _) in INVALID.items():
        if col in df.columns and (timed or col != "timestamp"):
            n = df.select(bad.fill_null(False).sum()).item()
            if n:
                counts[col] = int(n)
    return counts


def handle_invalid(
    lf: pl.LazyFrame, col: str, n: int, policy: str, source: Path, strings: StringsRead | None = None
) -> pl.LazyFrame:
    """Drop the rows with an invalid `col` (policy 'drop', counted by the caller) or raise naming them."""
    flagged = INVALID[col][1].fill_null(False)
    if policy == "error":
        rows = lf.filter(flagged).select("_row", col).head(_SHOW).collect()
        raise invalid_error(col, n, rows.rows(), source, strings)
    return lf.filter(~flagged)


def invalid_error(
    col: str, n: int, rows: list[tuple[int, Any]], source: Path, strings: StringsRead | None
) -> RecsysError:
    """The error for `n` invalid values of `col`; `rows` are the first offending (`_row`, value) pairs."""
    reason, _, expected = INVALID[col]
    lines = where([r for r, _ in rows], strings, source)
    return RecsysError(
        f"{source}: column {col!r} must hold {expected} but {n} rows do not (values "
        f"{[v for _, v in rows]}{' at ' + lines if lines else ''}); fix them, or drop such rows with "
        f"data.on_null=drop (counted in the manifest as {reason!r})"
    )


def _parses(col: str, dtype: pl.DataType, floats_ok: bool, numbers_only: bool) -> pl.Expr:
    """True where the string value of `col` parses as the typed reader parses it; with `numbers_only`,
    where it is a number at all (non-numbers are reported before fractions and out-of-range values)."""
    probe = pl.col(col).str.strip_chars()
    if numbers_only and (col == "timestamp" or dtype.is_float()):
        return probe.cast(pl.Float64, strict=False).is_not_null()
    ok = probe.cast(dtype, strict=False).is_not_null()
    if floats_ok and dtype.is_integer():  # a float column: whole numbers within range are fine
        f = probe.cast(pl.Float64, strict=False)
        ok = ok | (f.is_finite() & (f == f.floor()) & f.cast(dtype, strict=False).is_not_null())
    return ok


_FIXES = {
    "user_id": "Ids that are not numbers need data.id_type=str.",
    "item_id": "Ids that are not numbers need data.id_type=str.",
    "timestamp": "Timestamps are whole numbers (unix time); fix or remove those rows, or map another "
    "column with data.columns.timestamp.",
    "label": "Labels are 0 or 1; fix or remove those rows, or map another column with data.columns.label.",
}


def _bad_values(strings_lf: pl.LazyFrame, spec: dict[str, Any], source: Path) -> RecsysError | None:
    present = strings_lf.collect_schema().names()
    checks = [(c, t, tier) for tier in (True, False) for c, t in parsed_dtypes(spec).items()]
    for col, dtype, numbers_only in checks:
        if col not in present or not dtype.is_numeric():
            continue
        probe = pl.col(col).str.strip_chars()
        ok = _parses(col, dtype, float_source(spec, source, col), numbers_only)
        bad = (
            strings_lf.filter(pl.col(col).is_not_null() & (probe != "") & ~ok)
            .select("_line", col)
            .head(_SHOW)
            .collect()
        )
        if bad.height:
            kind = "integer" if dtype.is_integer() and col != "timestamp" else "number"
            unit = "row" if source.suffix in (".parquet", ".pq") else "line"
            shown = ", ".join(f"{unit} {line}: {value!r}" for line, value in bad.iter_rows())
            fix = _FIXES.get(col, "Fix or remove those rows, or map another column with data.columns.")
            return RecsysError(f"{source}: column {col!r} must hold {kind}s but has {shown}. {fix}")
    return None


def diagnose(
    strings: StringsRead | pl.LazyFrame,
    spec: dict[str, Any],
    source: Path,
    cause: BaseException,
    plain: Path | None = None,
) -> RecsysError:
    """Explain a failed typed read: the values that do not parse as their declared type, else the
    first line of `plain` (the uncompressed text file) that is not UTF-8 or has the wrong number of
    fields, else polars' own complaint (its first line)."""
    try:
        found = _bad_values(strings if isinstance(strings, pl.LazyFrame) else strings(), spec, source)
    except (*READ_ERRORS, RecsysError):
        found = None  # the string read fails too: the file's structure is broken, not a value
    if found is not None:
        return found
    text = layout(spec, plain) if plain is not None else None
    problem = text_problem(plain, text) if plain is not None and text is not None else None
    if problem:
        return RecsysError(f"{source}: {problem}")
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if source.suffix in (".parquet", ".pq"):  # damaged pages: the footer read, the data did not
        return RecsysError(f"{source}: not a readable Parquet file ({first}); check data.path or rewrite it")
    return RecsysError(
        f"{source}: cannot be read as data.format={spec['format']!r}: {first}; check data.format, "
        "data.separator and the file"
    )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def text_problem(path: Path, text: Layout) -> str | None:
    """The first line that is not UTF-8 or does not split into the layout's fields, described."""
    for no, raw in _lines(path):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return (
                f"line {no} is not valid UTF-8 (byte {raw[err.start : err.start + 1]!r} at position "
                f"{err.start + 1}); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
            )
    if text.separator is None:
        return None
    return _quoted_problem(path, text) if text.quoted else _split_problem(path, text)


def _split_problem(path: Path, text: Layout) -> str | None:
    sep, expected = text.separator, text.fields
    for no, raw in _lines(path):
        line = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")
        if not line:
            continue  # the readers skip empty lines; a line of blanks is not empty and is checked
        fields = line.split(sep)
        if expected is None:
            expected = len(fields)  # the header row
        elif len(fields) != expected:
            return _field_count(no, len(fields), expected, sep, line)
        if text.colon_pairs and any(":" in f for f in fields):
            return (
                f"line {no} has a ':' inside a field ({line[:80]!r}); with data.separator='::' and integer "
                "ids every field is a number"
            )
    return None


def _quoted_problem(path: Path, text: Layout) -> str | None:
    sep = text.separator
    lines = (raw.decode("utf-8").rstrip("\r\n") + "\n" for _, raw in _lines(path))
    reader = csv.reader(lines, delimiter=sep)
    expected, start = text.fields, 1
    for record in _records(reader):
        if isinstance(record, csv.Error):
            return f"line {reader.line_num} cannot be split into fields ({record})"
        end = reader.line_num
        if record and any("\n" in f for f in record):
            return (
                f"line {start}: a quoted field runs over {end - start + 1} lines, up to line {end}; "
                'is a closing quote (") missing?'
            )
        if record and expected is None:
            expected = len(record)
        elif record and len(record) != expected:
            return _field_count(start, len(record), expected, sep, sep.join(record))
        start = end + 1
    return None


def _records(reader: Any) -> Iterator[list[str] | csv.Error]:
    """The reader's records; a malformed one (e.g. a stray carriage return) ends them as its error."""
    try:
        yield from reader
    except csv.Error as err:
        yield err


def _field_count(no: int, got: int, expected: int, sep: str, line: str) -> str:
    return (
        f"line {no} has {got} fields separated by {sep!r} but the file's lines have {expected} "
        f"({line[:80]!r}); fix that line, or set data.separator / data.format to match the file"
    )


def check_not_empty(n_rows: int, source: Path, after: str) -> None:
    if n_rows == 0:
        raise RecsysError(
            f"{source}: no events left after {after}; loosen that setting "
            "(data.filter, data.time_window, ...) "
            "or check the input file"
        )
