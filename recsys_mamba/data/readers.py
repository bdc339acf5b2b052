"""Lazy readers: every supported file format -> one LazyFrame with the standard columns.

Standard columns: `user_id`, `item_id` (Int64, or String with `id_type: str`), `timestamp` Int64
(the position in the user's sequence for sequence formats), `event_type` Categorical, `rating` Float32,
`label` Int8, `category` (as in the file), and `_row`, the event's position in the file (ties in
time keep it). Columns the source does not have are left out. With `strings=True` every value column stays
a string and `_line` (1-based line number in the file) is added, for error diagnosis.

Nothing is repaired quietly: a value that does not fit its column (a fractional or non-finite number in
an integer column, a line with more fields than the header) makes the typed read fail, and
`recsys_mamba.data.validate.diagnose` then names the file, the column and the line.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recsys_mamba.errors import RecsysError

STANDARD = ("user_id", "item_id", "timestamp", "event_type", "rating", "label", "category")
_FIXED_DTYPES: dict[str, pl.DataType] = {
    "timestamp": pl.Int64(),
    "rating": pl.Float32(),
    "label": pl.Int8(),
    "event_type": pl.Categorical(),
}


_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
# the Parquet scan's row index, renamed to `_row` once the file's own columns are picked (so a file column
# called `_row` cannot clash with it)
_PARQUET_ROW = "__recsys_mamba_row__"


def id_dtype(spec: dict[str, Any]) -> pl.DataType:
    return pl.Int64() if spec["id_type"] == "int" else pl.String()


def target_dtypes(spec: dict[str, Any]) -> dict[str, pl.DataType]:
    """The dtype each standard column must have after reading (category keeps the file's)."""
    ids = id_dtype(spec)
    return {"user_id": ids, "item_id": ids, **_FIXED_DTYPES}


def parsed_dtypes(spec: dict[str, Any]) -> dict[str, pl.DataType]:
    """`target_dtypes` plus the columns a format parses with a fixed type of its own."""
    extra = {"category": pl.Int64()} if spec["format"] == "taobao" else {}
    return {**target_dtypes(spec), **extra}


def float_source(spec: dict[str, Any], path: Path, col: str) -> bool:
    """Whether `col` may come as floats (then whole numbers are accepted in integer columns)."""
    return path.suffix in (".parquet", ".pq") or (spec["format"] == "recbole" and col == "timestamp")


@dataclass(frozen=True)
class Layout:
    """How a text format splits lines into fields, for diagnosing lines polars refuses."""

    separator: str | None  # None: any number of fields (sequence files)
    fields: int | None  # None: as many as the header row has
    quoted: bool = False
    colon_pairs: bool = False  # '::' read as two ':' separators: no field may hold a ':'


def layout(spec: dict[str, Any], path: Path) -> Layout | None:
    """The text layout of `spec['format']`, or None for Parquet."""
    fmt = spec["format"]
    if fmt in ("events", "synthetic"):
        if path.suffix in (".parquet", ".pq"):
            return None
        return Layout(spec["separator"] or ",", None if spec["has_header"] else len(_mapped(spec)), True)
    if fmt == "recbole":
        return Layout("\t", None)
    if fmt == "movielens":
        sep = spec["separator"] or "::"
        return Layout(sep, 4, colon_pairs=sep == "::" and spec["id_type"] == "int")
    if fmt == "taobao":
        return Layout(",", 5)
    if fmt == "sequence_pairs":
        return Layout(" ", 2)
    return Layout(None, None)


def _mapped(spec: dict[str, Any]) -> list[str]:
    return [name for name in spec["columns"].values() if name]


def local_text(path: Path, scratch: Path) -> Path:
    """A plain-text path for `path`: gzip files are decompressed (streamed) into `scratch`."""
    if path.suffix != ".gz":
        return path
    plain = scratch / path.stem
    if plain.is_file():
        return plain
    try:
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (OSError, EOFError) as err:
        raise RecsysError(f"{path}: cannot decompress ({err}); is it really a gzip file?") from err
    return plain


def first_line(path: Path, shown: Path) -> str:
    """The first line of a text file; an empty file is an error."""
    with open(path, "rb") as f:
        raw = f.readline(1 << 16)
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    if not line.strip():
        raise RecsysError(
            f"{shown}: the file is empty (or starts with a blank line); point data.path at a data file"
        )
    return line


def _format_error(shown: Path, fmt: str, line: str, expected: str) -> RecsysError:
    return RecsysError(
        f"{shown}: does not look like a {fmt} file: line 1 is {line[:80]!r}, expected {expected}; "
        "check data.path and data.format"
    )


def _strict_cast(expr: pl.Expr, source: pl.DataType, target: pl.DataType) -> pl.Expr:
    """Cast that fails (instead of truncating) on fractional or non-finite floats in integer columns."""
    if source.is_float() and target.is_integer():
        # NaN fails the strict cast below, so the read stops and diagnose names the value
        whole = expr.is_null() | (expr.is_finite() & (expr == expr.floor()))
        expr = pl.when(whole).then(expr).otherwise(float("nan"))
    return expr.cast(target, strict=True)


def _finish(lf: pl.LazyFrame, spec: dict[str, Any], strings: bool, line_offset: int) -> pl.LazyFrame:
    """Cast the present standard columns to their dtypes (absent ones are left out) and add `_row`."""
    schema = lf.collect_schema()
    names = schema.names()
    dtypes = target_dtypes(spec)
    exprs = []
    for col in (c for c in STANDARD if c in names):
        expr = pl.col(col)
        if strings:
            expr = expr.cast(pl.String)
        elif col in dtypes:
            expr = _strict_cast(expr, schema[col], dtypes[col])
        exprs.append(expr)
    if "_row" not in names:
        lf = lf.with_row_index("_row")
    exprs.append(pl.col("_row"))
    if strings:
        line = pl.col("_line") if "_line" in names else pl.col("_row").cast(pl.Int64) + line_offset
        exprs.append(line.alias("_line"))
    return lf.select(exprs)


def _renamed(lf: pl.LazyFrame, spec: dict[str, Any], shown: Path, keep: str | None = None) -> pl.LazyFrame:
    """Pick and rename the configured columns of a headed file (and `keep`); missing ones are an error."""
    have = [name for name in lf.collect_schema().names() if name != keep]
    wanted = {std: name for std, name in spec["columns"].items() if name}
    missing = [f"{std} (column {name!r})" for std, name in wanted.items() if name not in have]
    if missing:
        raise RecsysError(
            f"{shown}: missing columns {', '.join(missing)}; the file has {have}. Rename them in the "
            "file or map them, e.g. data.columns.user_id=<column name>"
        )
    kept = [pl.col(keep)] if keep is not None else []
    return lf.select([pl.col(name).alias(std) for std, name in wanted.items()] + kept)


def _check_parquet_types(lf: pl.LazyFrame, shown: Path) -> None:
    """Nested, object and raw-byte columns cannot be ids, times or values: say so, naming the
    column, instead of failing to cast."""
    for name, dtype in lf.collect_schema().items():
        if dtype.is_nested() or dtype in (pl.Object, pl.Binary):
            raise RecsysError(
                f"{shown}: column {name!r} holds {dtype} values, not single numbers or UTF-8 strings; "
                "store it as numbers or text, or map another column with data.columns.<field>=<name>"
            )


def _header(path: Path, sep: str) -> list[str]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        return next(csv.reader(f, delimiter=sep), [])


def _csv_overrides(spec: dict[str, Any], strings: bool, header: list[str]) -> dict[str, pl.DataType]:
    """Typed columns. Every column the config does not map is read as a string: the pipeline parses
    all fields (so lines with extra fields fail), and an unused column must never fail the read. So
    is the category: a label column, whose type guessed from the first rows would reject a later
    label like 'A7' in a column of numbers."""
    mapped = _mapped(spec)
    other = {name: pl.String() for name in header if name not in mapped}
    if strings:
        return {**other, **{name: pl.String() for name in mapped}}
    dtypes = {**target_dtypes(spec), "category": pl.String()}
    return {**other, **{name: dtypes[std] for std, name in spec["columns"].items() if name and std in dtypes}}


def read_events(path: Path, spec: dict[str, Any], strings: bool = False) -> pl.LazyFrame:
    """Generic event log: Parquet (`.parquet`/`.pq`) or delimited text with a header row."""
    if path.suffix in (".parquet", ".pq"):
        try:
            # the scan's own row index: a slice of it is read from where it starts, while a
            # `with_row_index` above the scan counts every row before the slice (quadratic in slices)
            lf = pl.scan_parquet(path, row_index_name=_PARQUET_ROW)
            lf.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as err:
            raise RecsysError(f"{path}: not a readable Parquet file ({err}); check data.path") from err
        lf = _renamed(lf, spec, path, keep=_PARQUET_ROW).rename({_PARQUET_ROW: "_row"})
        _check_parquet_types(lf, path)
        return _finish(lf, spec, strings, line_offset=1)
    line = first_line(path, path)
    sep = spec["separator"] or ","
    if sep not in line:
        raise _format_error(path, "delimited event log", line, f"a header row separated by {sep!r}")
    lf = pl.scan_csv(
        path,
        separator=sep,
        has_header=spec["has_header"],
        schema_overrides=_csv_overrides(spec, strings, _header(path, sep) if spec["has_header"] else []),
        infer_schema=not strings,
        quote_char='"',
    )
    return _finish(_renamed(lf, spec, path), spec, strings, line_offset=1 + int(spec["has_header"]))


def read_recbole(path: Path, spec: dict[str, Any], strings: bool = False) -> pl.LazyFrame:
    """RecBole atomic `.inter`: tab-separated with a typed header `name:type`."""
    line = first_line(path, path)
    fields = line.split("\t")
    if not all(f.partition(":")[2] in _RECBOLE_TYPES for f in fields):
        raise _format_error(path, "RecBole atomic", line, "a header like 'user_id:token<TAB>item_id:token'")
    names = [f.split(":", 1)[0] for f in fields]
    overrides = _csv_overrides(spec, strings, names)
    ts_name = spec["columns"].get("timestamp")
    if not strings and ts_name in names:
        overrides[ts_name] = pl.Float64()  # RecBole types timestamps as float
    lf = pl.scan_csv(
        path,
        separator="\t",
        has_header=True,
        new_columns=names,
        schema_overrides=overrides,
        infer_schema=not strings,
        quote_char=None,
    )
    return _finish(_renamed(lf, spec, path), spec, strings, line_offset=2)


def _headless(path: Path, sep: str, names: list[str | None], dtypes: dict[str, pl.DataType], strings: bool):
    """Scan a header-less delimited file; `None` names are filler columns (dropped)."""
    cols = [name or f"_skip{i}" for i, name in enumerate(names)]
    schema = {
        c: (pl.String() if strings or c.startswith("_skip") else dtypes.get(c, pl.String())) for c in cols
    }
    lf = pl.scan_csv(path, separator=sep, has_header=False, schema=schema, quote_char=None)
    return lf.select([c for c in cols if not c.startswith("_skip")])


def read_movielens(path: Path, spec: dict[str, Any], strings: bool = False) -> pl.LazyFrame:
    """MovieLens ratings: `UserID::MovieID::Rating::Timestamp` (ML-1M) or tab-separated (ML-100K)."""
    line = first_line(path, path)
    sep = spec["separator"] or "::"
    fields = ["user_id", "item_id", "rating", "timestamp"]
    if len(line.split(sep)) != 4:
        raise _format_error(path, "MovieLens ratings", line, f"UserID{sep}MovieID{sep}Rating{sep}Timestamp")
    dtypes = {**target_dtypes(spec), "rating": pl.Float32()}
    if sep == "::" and spec["id_type"] == "str":
        lf = _split_lines(path, sep, list(fields), dtypes, strings)
    elif sep == "::":
        # '::' is two one-byte separators with an empty field between: the fast native parser reads it
        names: list[str | None] = [fields[0], None, fields[1], None, fields[2], None, fields[3]]
        lf = _headless(path, ":", names, dtypes, strings)
    else:
        lf = _headless(path, sep, list(fields), dtypes, strings)
    return _finish(lf, spec, strings, line_offset=1)


def _split_lines(
    path: Path, sep: str, names: list[str], dtypes: dict[str, pl.DataType], strings: bool
) -> pl.LazyFrame:
    """Split each line on a multi-character separator (slower than the CSV parser, but string ids
    may hold any single character of the separator). A line with extra fields keeps them in the last
    column, whose typed parse then fails and is diagnosed."""
    parts = pl.col("line").str.strip_chars_end("\r").str.splitn(sep, len(names))
    lf = (
        pl.scan_lines(path, name="line")
        .with_row_index("_line", offset=1)
        .filter(pl.col("line").str.strip_chars() != "")
    )
    raw = (parts.struct.field(f"field_{i}") for i in range(len(names)))
    fields = (  # an empty field is missing, as in the CSV readers
        pl.when(f != "").then(f).cast(pl.String if strings else dtypes.get(n, pl.String), strict=True)
        for f, n in zip(raw, names, strict=True)
    )
    return lf.select(pl.col("_line"), *(f.alias(n) for f, n in zip(fields, names, strict=True)))


def read_taobao(path: Path, spec: dict[str, Any], strings: bool = False) -> pl.LazyFrame:
    """Taobao UserBehavior: `user,item,category,behavior,timestamp`, no header."""
    line = first_line(path, path)
    if len(line.split(",")) != 5:
        raise _format_error(path, "Taobao UserBehavior", line, "user,item,category,behavior,timestamp")
    names: list[str | None] = ["user_id", "item_id", "category", "event_type", "timestamp"]
    dtypes = {**target_dtypes(spec), "category": pl.Int64()}
    return _finish(_headless(path, ",", names, dtypes, strings), spec, strings, line_offset=1)


def read_sequences(path: Path, spec: dict[str, Any], strings: bool = False) -> pl.LazyFrame:
    """One user per line, `user item item ...` in time order; timestamp = position in the line."""
    line = first_line(path, path)
    if len(line.split()) < 2 or "::" in line or "," in line:
        raise _format_error(path, "sequence", line, "'user item item ...' separated by spaces")
    tokens = (
        pl.scan_lines(path, name="line")
        .with_row_index("_line", offset=1)
        .filter(pl.col("line").str.strip_chars() != "")
        .select(pl.col("_line"), pl.col("line").str.strip_chars().str.split(" ").alias("tok"))
        .select(
            pl.col("_line"),
            pl.col("tok").list.first().alias("user_id"),
            pl.col("tok").list.slice(1).alias("item_id"),
            pl.int_ranges(0, pl.col("tok").list.len() - 1).alias("timestamp"),
        )
        .explode(["item_id", "timestamp"], empty_as_null=True)
        # a line without items stays as one row with a null item (counted or refused as a null);
        # only the empty strings between repeated spaces go
        .filter(pl.col("item_id").is_null() | (pl.col("item_id") != ""))
    )
    if not strings:
        tokens = tokens.drop("_line")
    return _finish(tokens, spec, strings, line_offset=0)


def read_sequence_pairs(path: Path, spec: dict[str, Any], strings: bool = False) -> pl.LazyFrame:
    """SASRec format: one `user item` pair per line, each user's lines in time order."""
    line = first_line(path, path)
    if len(line.split(" ")) != 2:
        raise _format_error(path, "SASRec 'user item'", line, "two ids separated by one space")
    lf = _headless(path, " ", ["user_id", "item_id"], target_dtypes(spec), strings)
    lf = lf.with_row_index("_row").with_columns(pl.int_range(pl.len()).over("user_id").alias("timestamp"))
    return _finish(lf, spec, strings, line_offset=1)


READERS: dict[str, Callable[[Path, dict[str, Any], bool], pl.LazyFrame]] = {
    "events": read_events,
    "synthetic": read_events,
    "recbole": read_recbole,
    "movielens": read_movielens,
    "taobao": read_taobao,
    "sequences": read_sequences,
    "sequence_pairs": read_sequence_pairs,
}

# formats whose timestamps are positions in the user's sequence, not times
POSITIONAL = ("sequences", "sequence_pairs")


def read(path: Path, spec: dict[str, Any], scratch: Path, strings: bool = False) -> pl.LazyFrame:
    """The standard LazyFrame of `path` in `spec['format']` (gzip text is unpacked into scratch)."""
    if not path.is_file():
        raise RecsysError(f"{path}: no such file; set data.path (or paths.data_dir / RECSYS_DATA_DIR)")
    plain = local_text(path, scratch)
    try:
        return READERS[spec["format"]](plain, spec, strings)
    except RecsysError as err:
        raise RecsysError(str(err).replace(str(plain), str(path))) from None
