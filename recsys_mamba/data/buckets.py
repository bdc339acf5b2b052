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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_mamba.data import readers, steps, validate
from recsys_mamba.errors import RecsysError

# events per bucket when `buckets` is not set (peak memory is ~100-150 bytes per event of a bucket)
DEFAULT_BUCKET_EVENTS = 4_000_000
# user ids sampled for the boundaries
_SAMPLE = 1_000_000
# rows per slice of a Parquet source in the partition pass
SLICE_ROWS = 8_000_000
_SHOW = 5
# entries of the bucket lookup table over the boundaries' id range (uint32: 64 MiB at most)
_TABLE_LIMIT = 1 << 24
# bytes of scratch and output disk per input event at the peak, with a margin: 62 measured on the
# 100 M-event bench scale log (buckets, cleaned buckets, output parts as uncompressed Arrow, outputs)
DISK_BYTES_PER_EVENT = 100


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


class Trash:
    """Removes intermediate files on a background thread: freeing a file of a few hundred MB is kernel
    work the next task need not wait for. `close` waits until every file handed over is gone, so the
    scratch folder can be removed after it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-trash")

    def discard(self, path: Path) -> None:
        # a file that cannot be removed stays in the scratch folder, whose removal then reports it
        self._pool.submit(path.unlink, missing_ok=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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


# ---- the partition pass ----------------------------------------------------------------------------


def slices(source: Source, events: int) -> list[pl.LazyFrame]:
    """The source as consecutive row ranges of `SLICE_ROWS` rows when it is Parquet (Polars' Parquet
    scan holds memory that grows with the file, ~1 GB more per 100 M events: a slice bounds it), else
    the whole streaming scan (the text readers stream in bounded memory)."""
    if source.plain.suffix not in (".parquet", ".pq") or events <= SLICE_ROWS:
        return [source.lf]
    return [source.lf.slice(start, SLICE_ROWS) for start in range(0, events, SLICE_ROWS)]


def boundaries(source: Source, n_buckets: int, events: int) -> pl.Series:
    """Sorted user ids that start buckets 1..n-1 (fewer when heavy users span several quantiles)."""
    step = max(1, events // _SAMPLE)
    found = []
    try:
        for part in slices(source, events):
            sample = part.filter(pl.col("_row") % step == 0).select("user_id")
            found.append(sample.collect(engine="streaming", optimizations=source.flags(False)))
    except validate.READ_ERRORS as err:
        raise source.failed(err) from None
    ids = pl.concat(found).get_column("user_id").drop_nulls().sort()
    if ids.len() == 0 or n_buckets <= 1:
        return ids.head(0)
    at = (np.arange(1, n_buckets) * ids.len()) // n_buckets
    return ids.gather(at).unique(maintain_order=True)


def bucket_key(bounds: pl.Series) -> pl.Expr:
    """The bucket of each row's user: the number of boundaries <= its id; null for a null id.

    Integer ids whose boundaries span a compact range look their bucket up in a table over that range
    (`steps.lookup`), cheaper per row than a binary search among the boundaries (BENCHMARKS.md)."""
    if bounds.len() == 0:
        key = pl.lit(0, dtype=pl.UInt32)
    elif bounds.dtype.is_integer() and int(bounds[-1]) - int(bounds[0]) < _TABLE_LIMIT:
        lo, hi = int(bounds[0]), int(bounds[-1])
        table = np.searchsorted(bounds.to_numpy(), np.arange(lo, hi + 1), side="right").astype(np.uint32)
        key = steps.lookup("user_id", lo, table, below=0, above=bounds.len()).cast(pl.UInt32)
    else:
        key = pl.lit(bounds).search_sorted(pl.col("user_id"), side="right").cast(pl.UInt32)
    return pl.when(pl.col("user_id").is_null()).then(pl.lit(None, dtype=pl.UInt32)).otherwise(key)


@dataclass
class Partitioned:
    """What the partition pass saw: rows read, rows per bucket, and the rows without a user id."""

    rows: int = 0
    bucket_rows: dict[int, int] = field(default_factory=dict)
    null_users: int = 0
    null_user_rows: list[int] = field(default_factory=list)  # first `_row`s, for the error message


def raw_parts(scratch: Path | str, bucket: int) -> list[Path]:
    """The partition files of one bucket, in file order (the sink may cut a bucket in several)."""
    return sorted(folder(Path(scratch)).glob(f"raw-{bucket:05d}-*.arrow"))


def partition(source: Source, bounds: pl.Series, scratch: Path, events: int) -> Partitioned:
    """One streaming pass over the source (Polars' partitioned Arrow IPC sink, slice by slice): each
    row goes to its bucket's files, in file order. Rows without a user id go to files of their own,
    which are only counted (the null check drops or refuses them)."""
    root = folder(scratch)
    root.mkdir(parents=True, exist_ok=True)
    key = bucket_key(bounds).alias("_bucket")
    try:
        for i, part in enumerate(slices(source, events)):

            def name(args: Any, i: int = i) -> str:
                key = args.partition_keys.get_column("_bucket")[0]
                bucket = "null" if key is None else f"{key:05d}"
                return str(root / f"raw-{bucket}-{i:05d}-{args.index_in_partition:04d}.arrow")

            target = pl.PartitionBy(str(root), key="_bucket", include_key=False, file_path_provider=name)
            part.with_columns(key).sink_ipc(
                target, compression="uncompressed", engine="streaming", optimizations=source.flags()
            )
    except validate.READ_ERRORS as err:
        raise source.failed(err) from None
    out = Partitioned()
    for part in sorted(root.glob("raw-*.arrow")):
        rows = ipc_rows(part)
        out.rows += rows
        key = part.name.split("-")[1]
        if key == "null":
            out.null_users += rows
            first = pl.scan_ipc(part).select("_row").head(_SHOW).collect().get_column("_row").to_list()
            out.null_user_rows = sorted([*out.null_user_rows, *first])[:_SHOW]
            part.unlink()
        else:
            out.bucket_rows[int(key)] = out.bucket_rows.get(int(key), 0) + rows
    return out


def ipc_rows(source: Path) -> int:
    """Rows of an Arrow IPC file, from its batches' headers: far cheaper per file than a Polars scan,
    and the partition pass leaves one file per slice and bucket (thousands at a few hundred M events)."""
    with pa.memory_map(str(source)) as mapped:
        reader = pa.ipc.open_file(mapped)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def first_rows(found: list[list[Any]], key: Callable[[Any], Any] | None = None) -> list[Any]:
    """The first `_SHOW` of several buckets' sorted first rows, in file order."""
    return sorted((r for rows in found for r in rows), key=key)[:_SHOW]
