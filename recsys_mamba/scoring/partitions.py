"""Streamed scoring: the input is read one partition of users at a time, so the job's memory is bounded
by a partition (`partition_events`), not by the input.

A first streaming pass keeps one row per user (its id, its events, how many of them the model knows):
enough to number the output parts exactly as reading the whole input would (users sorted by id,
`chunk_size` per part), to count cold users and unknown items for the manifest, and to cut the parts
into partitions of about `partition_events` events. Each partition is then read by a filter on its
users, turned into histories and scored into its parts; a partition whose parts all exist (a rerun)
is not read at all. So the parts and `_SUCCESS` are byte-identical for any partition size, under
either engine, and to reading the input whole. `score_partition` is all a worker runs: the local loop
and the Ray actors (`scoring.ray_job`) call the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_mamba.data.buckets import SLICE_ROWS
from recsys_mamba.data.readers import Layout
from recsys_mamba.data.validate import READ_ERRORS, text_problem
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import Run
from recsys_mamba.runs import events as ev
from recsys_mamba.scoring import batch, inputs, parts

ROW = ev.ROW


@dataclass(frozen=True)
class Scan:
    """An input (event log, pairs or prepared folder) as a lazy read: plain data, so it travels to Ray
    workers, which open the file themselves (on a cluster: a path on shared storage)."""

    path: str
    kind: str  # prepared | csv | parquet (`inputs.source_kind`)

    @classmethod
    def of(cls, path: str | Path) -> Scan:
        """The input at `path`, absolute: a Ray worker may start in another folder."""
        return cls(str(Path(path).absolute()), inputs.source_kind(Path(path)))

    def _files(self) -> pl.LazyFrame:
        path = Path(self.path)
        if self.kind == "csv":
            return pl.scan_csv(path, infer_schema=False)  # every column as text, as `inputs.read_table`
        if path.is_dir():
            return pl.concat([pl.scan_parquet(f) for f in inputs.parquet_files(path)], how="diagonal_relaxed")
        return pl.scan_parquet(path)

    def lazy(self) -> pl.LazyFrame:
        """The raw columns and, for files, each row's 1-based row (`ROW`) for error messages; a prepared
        folder as `inputs.prepared_scan` gives it (ids as text)."""
        if self.kind == "prepared":
            return inputs.prepared_scan(Path(self.path))
        return self._files().with_row_index(ROW, offset=1)

    def pieces(self) -> list[pl.LazyFrame]:
        """`lazy()` as consecutive row ranges of `SLICE_ROWS` rows when it is Parquet: Polars' Parquet scan
        holds memory that grows with the file (unsliced, the job's peak RSS grew by 600 MiB from 10 M to
        50 M input events); a slice bounds it. Text and prepared folders stream as they are."""
        if self.kind != "parquet":
            return [self.lazy()]
        path = Path(self.path)
        try:
            files = inputs.parquet_files(path) if path.is_dir() else [path]
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        except (OSError, pa.ArrowException) as err:
            raise self.failed(err) from None
        if rows <= SLICE_ROWS:
            return [self.lazy()]
        whole = self._files()
        return [
            whole.slice(s, SLICE_ROWS).with_row_index(ROW, offset=s + 1) for s in range(0, rows, SLICE_ROWS)
        ]

    def rows(self, keep: pl.Expr) -> pl.DataFrame:
        """The rows for which `keep` holds, in file order, with `ROW`; read slice by slice."""
        return pl.concat([self.collect(piece.filter(keep)) for piece in self.pieces()])

    def failed(self, err: BaseException) -> RecsysError:
        """A read error, explained as `inputs.read_table` explains it."""
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if self.kind == "csv":
            detail = text_problem(Path(self.path), Layout(",", None, quoted=True)) or first
            return RecsysError(f"input={self.path}: cannot be read as CSV: {detail}")
        if self.kind == "prepared":
            return RecsysError(
                f"input={self.path}: a prepared folder with unreadable files ({first}); prepare it again"
            )
        return RecsysError(
            f"input={self.path}: not a readable Parquet or .csv file, or Parquet parts whose column types "
            f"clash ({first}); give every part the same schema"
        )

    def collect(self, lf: pl.LazyFrame) -> pl.DataFrame:
        try:
            return lf.collect(engine="streaming")
        except READ_ERRORS as err:
            raise self.failed(err) from None

    def schema(self) -> pl.Schema:
        try:
            return self.lazy().collect_schema()
        except READ_ERRORS as err:
            raise self.failed(err) from None

    def ids(self, col: str, schema: pl.Schema) -> pl.Expr:
        """`col` as text, lazily, as `runs.events.as_ids` gives it (whole floats as integers)."""
        if schema[col].is_float():
            return pl.col(col).cast(pl.Int64, strict=False).cast(pl.String)  # others fail `problems`
        return pl.col(col).cast(pl.String)

    def rows_of(self, users: pl.Series) -> pl.DataFrame:
        """Every row of the users `users` (file order kept), with `ROW`."""
        uid = self.ids("user_id", self.schema())
        return self.rows(uid.is_in(pl.Series(users, dtype=pl.String).implode()))


def _problems(schema: pl.Schema) -> pl.Expr:
    """Rows whose ids `runs.events` would refuse: missing, or floats that are not whole numbers."""
    bad = pl.lit(False)
    for col in inputs.EVENT_COLUMNS:
        c = pl.col(col)
        bad = bad | c.is_null()
        if schema[col].is_float():
            bad = bad | ~(c.is_finite() & (c == c.floor()) & (c.abs() < 2.0**63))
    return bad


@dataclass
class Users:
    """One row per user of an input: user_id (text), events, known (events of items the model knows);
    and the input's id types (`runs.events.id_type`, over the whole input)."""

    table: pl.DataFrame
    types: dict[str, pl.DataType]

    @property
    def unknown(self) -> int:
        return int(self.table["events"].sum() - self.table["known"].sum())


def user_table(scan: Scan, known_items: list[str]) -> Users:
    """The first pass over `scan`: per-user counts (a streaming group-by: memory grows with the users,
    not the events) and the id types; the id checks of `runs.events`, errors naming the file's rows."""
    schema = scan.schema()
    columns_only = pl.DataFrame(schema={c: t for c, t in schema.items() if c != ROW})
    ev.check_id_columns(columns_only, f"input={scan.path}")  # columns and their types, no rows yet
    uid, item = scan.ids("user_id", schema), scan.ids("item_id", schema)
    selected = (
        uid.alias("user_id"),
        item.is_in(pl.Series(known_items, dtype=pl.String).implode()).alias("known"),
        _problems(schema).alias("bad"),
    )
    counts = (pl.len().alias("events"), pl.col("known").sum(), pl.col("bad").sum())
    table = None
    for piece in scan.pieces():  # per slice, then merged: one row per user at any time
        found = scan.collect(piece.select(selected).group_by("user_id").agg(counts))
        found = found.with_columns(pl.col("events", "known", "bad").cast(pl.Int64))
        merged = found if table is None else pl.concat([table, found])
        table = merged.group_by("user_id").agg(pl.col("events", "known", "bad").sum())
    assert table is not None
    if table["bad"].sum():
        bad = scan.rows(_problems(schema))  # only the rows at fault: for the message
        ev.check_id_columns(bad, f"input={scan.path}")
        for col in inputs.EVENT_COLUMNS:
            ev.as_ids(bad, col, f"input={scan.path}")
    table = table.drop("bad").sort("user_id")
    text_file = scan.kind == "csv"

    def distinct(col: str) -> pl.Series:
        """What `id_type` must see of `col`: a CSV's every distinct id (integers only if each is one),
        else nothing but the type, which decides."""
        if not (text_file and schema[col] == pl.String):
            return pl.Series([], dtype=schema[col])
        if col == "user_id":
            return table["user_id"]
        return scan.collect(scan.lazy().select(item.alias(col)).unique())[col]

    return Users(table, {c: ev.id_type(distinct(c), text_file) for c in inputs.EVENT_COLUMNS})


@dataclass
class Partition:
    first: int  # the index of its first output part
    users: pl.Series  # sorted: whole parts of `chunk_size` users (the last partition: maybe fewer); a
    # Series, not a list of Python strings: far smaller, and every partition's travels to Ray


def cut(users: pl.DataFrame, chunk_size: int, partition_events: int) -> list[Partition]:
    """Consecutive whole parts of `users` (sorted, with `events`) grouped while a partition holds at most
    `partition_events` events (at least one part each)."""
    n_parts = math.ceil(len(users) / chunk_size)
    per_part = np.add.reduceat(users["events"].to_numpy(), np.arange(n_parts) * chunk_size) if n_parts else []
    ids = users["user_id"]
    out, start, held = [], 0, 0
    for j, events in enumerate(per_part):
        if j > start and held + events > partition_events:
            out.append(Partition(start, ids.slice(start * chunk_size, (j - start) * chunk_size)))
            start, held = j, 0
        held += int(events)
    if n_parts:
        out.append(Partition(start, ids.slice(start * chunk_size)))
    return out


@dataclass
class Plan:
    """What every partition's worker needs, and nothing that holds the model or the data."""

    mode: str  # topk | candidates
    out: str
    prefix: str
    chunk_size: int
    top_k: int
    exclude_seen: bool
    pause_s: float
    scan: Scan  # topk: the events; candidates: the pairs
    history: Scan | None  # candidates: where the histories come from
    types: dict[str, pl.DataType]  # the output's id types
    partitions: list[Partition] = field(default_factory=list)


def score_partition(run: Run, plan: Plan, index: int) -> list[dict[str, Any]]:
    """Score partition `index` into its parts (those a previous run finished are kept); the parts' rows."""
    part = plan.partitions[index]
    out = Path(plan.out)
    count = math.ceil(len(part.users) / plan.chunk_size)
    paths = [parts.part_path(out, plan.prefix, part.first + j) for j in range(count)]
    if all(p.is_file() for p in paths):  # a rerun: the partition is not read again
        return [parts.part_info(p) for p in paths]
    chunks, score = _topk(run, plan, part) if plan.mode == "topk" else _candidates(run, plan, part)
    return parts.run_parts(out, plan.prefix, chunks, score, False, plan.pause_s, first=part.first)


def _histories(run: Run, scan: Scan, users: pl.Series) -> pl.DataFrame:
    rows = scan.rows_of(users)
    return ev.histories(run.data, ev.event_frame(rows, f"input={scan.path}"))[0]


def _topk(run: Run, plan: Plan, part: Partition) -> tuple[list[pl.DataFrame], Any]:
    users = _histories(run, plan.scan, part.users)

    def score(chunk: pl.DataFrame) -> pl.DataFrame:
        return inputs.with_id_types(batch.topk_chunk(run, chunk, plan.top_k, plan.exclude_seen), plan.types)

    return chunked(users, plan.chunk_size), score


def _candidates(run: Run, plan: Plan, part: Partition) -> tuple[list[pl.DataFrame], Any]:
    assert plan.history is not None
    pairs = ev.pair_frame(plan.scan.rows_of(part.users), f"input={plan.scan.path}")
    users = ev.with_users(_histories(run, plan.history, part.users), pairs["user_id"])

    def score(chunk: pl.DataFrame) -> pl.DataFrame:
        mine = pairs.join(chunk.select("user_id"), on="user_id", how="semi")
        scored = batch.candidate_chunk(run, chunk, mine)
        return inputs.with_id_types(scored, plan.types)  # the pairs' ids, as the input had them

    return chunked(users, plan.chunk_size), score


def chunked(frame: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    return [frame.slice(i, size) for i in range(0, len(frame), size)]
