"""User buckets on disk: how many, where each user goes, and the one streaming pass that writes them.

`prepare` bounds its memory by a bucket instead of by the log: the events are split by user into
buckets (Arrow IPC files in the run's scratch folder), and everything after that works on one bucket
at a time (`recsys_mamba.data.tasks`), plus small global tables (one row per item, per category).

The split is a *range* partition over the sorted user ids: bucket b holds the users with
`boundaries[b - 1] <= user_id < boundaries[b]`. Users are numbered 1..n in sorted-id order
(`format`), so concatenating the buckets in order gives the global order of every output: a bucket's
users are numbered from the count of users in the buckets before it, and its rows are appended
after theirs. A hash partition would need a global merge at the end. The boundaries are quantiles of
a sample of the log's user ids (rows, so heavy users weigh more and buckets hold similar numbers of
events); they decide only how the work is cut, never what comes out, so the outputs are the same
for any number of buckets.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from recsys_mamba.data import readers, validate
from recsys_mamba.errors import RecsysError

# events per bucket when `buckets` is not set (peak memory is ~100-150 bytes per event of a bucket)
DEFAULT_BUCKET_EVENTS = 4_000_000
# rows per batch of the partition pass (its memory, besides the source reader's own buffers)
PARTITION_CHUNK = 1_000_000
# user ids sampled for the boundaries
_SAMPLE = 1_000_000
_SHOW = 5
# bytes of scratch and output disk per input event at the peak (measured on the bench log: buckets,
# cleaned buckets and output parts as uncompressed Arrow, plus the final Parquet files); with a margin
DISK_BYTES_PER_EVENT = 160


def folder(scratch: Path) -> Path:
    return Path(scratch) / "buckets"


def path(scratch: Path | str, kind: str, bucket: int, suffix: str = "") -> Path:
    """`<scratch>/buckets/<kind>-<bucket>[<suffix>].arrow`: every intermediate file has its own name."""
    return folder(Path(scratch)) / f"{kind}-{bucket:05d}{suffix}.arrow"


def write_ipc(df: pl.DataFrame, target: Path) -> None:
    """Write an intermediate frame under a temporary name, then rename: a task that dies halfway and
    is run again never finds half a file under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    df.write_ipc(tmp, compression="uncompressed")
    os.replace(tmp, target)


def read_ipc(source: Path, columns: list[str] | None = None) -> pl.DataFrame:
    return pl.read_ipc(source, columns=columns)


# ---- how many buckets ----------------------------------------------------------------------------


def estimate_events(source: Path, spec: dict[str, Any], plain: Path) -> int:
    """Events in the source: exact for Parquet (its footer), else from the first MiB of the text."""
    if plain.suffix in (".parquet", ".pq"):
        try:
            return int(pq.ParquetFile(plain).metadata.num_rows)
        except (OSError, pa.ArrowException):
            return 0  # the read reports what is wrong with the file
    size = plain.stat().st_size
    with open(plain, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        return 0
    lines = [line for line in head.split(b"\n") if line.strip()]
    if len(head) == size:  # the whole file: count it
        size_seen = size
    else:
        lines, size_seen = lines[:-1] or lines, head.rfind(b"\n") + 1 or len(head)
    if spec["format"] == "sequences":
        events = sum(max(len(line.split()) - 1, 1) for line in lines)
    else:
        events = len(lines)
    return max(1, math.ceil(events * size / max(size_seen, 1)))


def choose(requested: int | None, events: int, bucket_events: int) -> int:
    """`requested`, or enough buckets for `bucket_events` events each."""
    if requested is not None:
        return int(requested)
    return max(1, math.ceil(events / bucket_events))


def check_disk(where: Path, events: int, target: Path) -> None:
    """Refuse up front a log whose buckets and outputs cannot fit the free disk beside the output."""
    need = events * DISK_BYTES_PER_EVENT
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise RecsysError(
            f"{target}: preparing about {events:,} events needs about {need / 2**30:.1f} GiB of free disk "
            f"for its buckets and outputs, but {where} has {free / 2**30:.1f} GiB free; free disk space or "
            "choose an out_dir= / paths.cache_dir= on a larger disk. Nothing was written"
        )


# ---- reading the source --------------------------------------------------------------------------


@dataclass
class Source:
    """The typed lazy read of the event file, and what is needed to explain a failed read."""

    path: Path
    spec: dict[str, Any]
    scratch: Path
    lf: pl.LazyFrame = field(init=False)
    plain: Path = field(init=False)
    every_field: bool = field(init=False)

    def __post_init__(self) -> None:
        self.lf = readers.read(self.path, self.spec, self.scratch)
        self.plain = readers.local_text(self.path, self.scratch)
        # with projection pushdown polars skips the fields no column needs, and with them the check
        # that a line has no more fields than the header
        self.every_field = readers.layout(self.spec, self.plain) is not None

    def strings(self) -> pl.LazyFrame:
        return readers.read(self.path, self.spec, self.scratch, strings=True)

    def flags(self, every_field: bool | None = None) -> pl.QueryOptFlags:
        every = self.every_field if every_field is None else every_field
        return pl.QueryOptFlags(projection_pushdown=False) if every else pl.QueryOptFlags()

    def failed(self, err: BaseException) -> RecsysError:
        return validate.diagnose(self.strings, self.spec, self.path, err, self.plain)

    def schema(self) -> pl.Schema:
        try:
            return self.lf.collect_schema()
        except validate.READ_ERRORS as err:
            raise self.failed(err) from None

    def collect(self, engine: str) -> pl.DataFrame:
        """The whole log in memory (one bucket)."""
        try:
            return self.lf.collect(engine=engine, optimizations=self.flags()).rechunk()
        except validate.READ_ERRORS as err:
            raise self.failed(err) from None


def strings_as_text(df: pl.DataFrame) -> pl.DataFrame:
    """Categorical columns (event types) as plain strings, so every bucket has the same schema."""
    cats = [name for name, dtype in df.schema.items() if isinstance(dtype, (pl.Categorical, pl.Enum))]
    return df.with_columns(pl.col(cats).cast(pl.String)) if cats else df


# ---- the partition pass ----------------------------------------------------------------------------


def boundaries(source: Source, n_buckets: int, events: int) -> pl.Series:
    """Sorted user ids that start buckets 1..n-1 (fewer when heavy users span several quantiles)."""
    step = max(1, events // _SAMPLE)
    sample = source.lf.filter(pl.col("_row") % step == 0).select("user_id")
    try:
        ids = sample.collect(engine="streaming", optimizations=source.flags(False)).get_column("user_id")
    except validate.READ_ERRORS as err:
        raise source.failed(err) from None
    ids = ids.drop_nulls().sort()
    if ids.len() == 0 or n_buckets <= 1:
        return ids.head(0)
    at = (np.arange(1, n_buckets) * ids.len()) // n_buckets
    return ids.gather(at).unique(maintain_order=True)


def bucket_of(user_id: pl.Series, bounds: pl.Series) -> np.ndarray:
    """The bucket of each (non-null) user id: the number of boundaries <= it."""
    if bounds.len() == 0:
        return np.zeros(user_id.len(), dtype=np.int64)
    if user_id.dtype.is_integer():
        return np.searchsorted(bounds.to_numpy(), user_id.to_numpy(), side="right")
    return pl.select(pl.lit(bounds).search_sorted(user_id, side="right")).to_series().to_numpy()


@dataclass
class Partitioned:
    """What the partition pass saw: rows read, rows per bucket, and the rows without a user id."""

    rows: int = 0
    bucket_rows: dict[int, int] = field(default_factory=dict)
    null_users: int = 0
    null_user_rows: list[int] = field(default_factory=list)  # first `_row`s, for the error message


def partition(source: Source, bounds: pl.Series, scratch: Path, engine: str) -> Partitioned:
    """One streaming pass over the source: each batch split by bucket and appended to that bucket's
    Arrow IPC file (in file order, so a bucket keeps its rows in file order). Rows without a user id
    are counted (they go to no bucket: the null check drops or refuses them)."""
    out = Partitioned()
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    folder(scratch).mkdir(parents=True, exist_ok=True)
    try:
        try:
            batches = source.lf.collect_batches(
                chunk_size=PARTITION_CHUNK, engine="streaming", optimizations=source.flags()
            )
            for batch in batches:
                _split(strings_as_text(batch), bounds, scratch, writers, out)
        except validate.READ_ERRORS as err:
            raise source.failed(err) from None
    finally:
        for writer in writers.values():
            writer.close()
    return out


def _split(
    batch: pl.DataFrame,
    bounds: pl.Series,
    scratch: Path,
    writers: dict[int, ipc.RecordBatchFileWriter],
    out: Partitioned,
) -> None:
    out.rows += batch.height
    users = batch.get_column("user_id")
    if users.null_count():
        missing = batch.filter(users.is_null())
        out.null_users += missing.height
        out.null_user_rows.extend(missing.get_column("_row").head(_SHOW).to_list())
        del out.null_user_rows[_SHOW:]
        batch = batch.filter(users.is_not_null())
        users = batch.get_column("user_id")
    if batch.height == 0:
        return
    keyed = batch.with_columns(pl.Series("_bucket", bucket_of(users, bounds), dtype=pl.UInt32))
    for (b,), piece in keyed.partition_by("_bucket", as_dict=True, include_key=False).items():
        table = piece.to_arrow()
        writer = writers.get(b)
        if writer is None:
            writer = writers[b] = ipc.new_file(str(path(scratch, "raw", b)), table.schema)
        writer.write_table(table)
        out.bucket_rows[b] = out.bucket_rows.get(b, 0) + piece.height


def first_rows(found: list[list[Any]], key: Callable[[Any], Any] | None = None) -> list[Any]:
    """The first `_SHOW` of several buckets' sorted first rows, in file order."""
    return sorted((r for rows in found for r in rows), key=key)[:_SHOW]
