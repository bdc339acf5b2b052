"""Files in, Parquet + manifest out: the `prepare` pipeline (output contract: `recsys_mamba.data.format`).

Memory is bounded by a bucket of users, not by the log (`recsys_mamba.data.buckets`): one streaming
pass splits the events by a range of user ids into buckets on disk, and each later stage works on one
bucket at a time (`recsys_mamba.data.tasks`; in this process or as Ray tasks, `engine`), with small
global tables in between: item counts for the frequency filter, the item / category / event type
maps, per-bucket user and positive counts. Every output is the buckets' parts concatenated in order
and written by one Parquet writer in fixed-size row groups, so the files are byte-identical for any
number of buckets and either engine. A log small enough for one bucket is read straight into memory.
Every dropped row is counted by reason in the manifest.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from omegaconf import DictConfig

from recsys_mamba.data import attributes, buckets, engines, readers, steps, synthetic, tasks, validate
from recsys_mamba.data import format as fmt
from recsys_mamba.data.buckets import DEFAULT_BUCKET_EVENTS
from recsys_mamba.data.cache import atomic_folder, describe_source, known_sources, reusable
from recsys_mamba.data.spec import check_source, config_hash, normalize
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import exclusive
from recsys_mamba.schema import Choice, Int, Rule, Schema
from recsys_mamba.version import __version__

log = logging.getLogger(__name__)

# Rows per Parquet row group of every output (sequences: users). Fixed, so the bytes of a file depend
# only on its rows, not on how many buckets (or Polars threads) produced them.
ROW_GROUP_ROWS = 131_072
SEQUENCE_ROW_GROUP_ROWS = 8_192
# per-bucket tables (item counts, item statistics) are folded into the running total once this many
# rows wait, so the driver holds O(items), not O(items x buckets)
_FOLD_ROWS = 2_000_000


class _Run:
    """The per-step row counts and drop reasons of the manifest."""

    def __init__(self, spec: dict[str, Any], source: Path) -> None:
        self.spec, self.source = spec, source
        self.steps: list[dict[str, Any]] = []
        self.dropped: dict[str, int] = {}
        self.rows = 0  # rows after the last step

    def record(self, name: str, rows_in: int, rows_out: int, dropped: dict[str, int]) -> None:
        self.steps.append({"step": name, "rows_in": rows_in, "rows_out": rows_out})
        for reason, n in dropped.items():
            if n:
                self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.rows = rows_out
        validate.check_not_empty(rows_out, self.source, f"step {name!r}")

    def drop(self, name: str, reason: str, n: int) -> None:
        self.record(name, self.rows, self.rows - n, {reason: n})


def has_timestamps(spec: dict[str, Any]) -> bool:
    if spec["format"] in readers.POSITIONAL:
        return False
    if spec["format"] in ("movielens", "taobao"):
        return True
    return spec["columns"].get("timestamp") is not None


def _check_columns(run: _Run, columns: list[str], timed: bool) -> None:
    """Settings the file's columns cannot serve, refused before any event is read."""
    spec, source = run.spec, run.source
    for col in validate.required_columns(spec, timed):
        if col not in columns:
            raise RecsysError(
                f"{source}: the data config needs column {col!r} (for ctr.label_from or timestamps) "
                f"but the file has none; map it with data.columns.{col}=<name> or change data.ctr"
            )
    window = spec["time_window"]
    if (window["start"] is not None or window["end"] is not None) and not timed:
        raise RecsysError(
            "data config: data.time_window needs real timestamps; this source has only an order"
        )
    if spec["rating_events"] and "rating" not in columns:
        raise RecsysError(
            f"{source}: data.rating_events=true but the file has no rating column; "
            "set data.columns.rating (or data.rating_events=false)"
        )
    ctr = spec["ctr"]
    if ctr and ctr["label_from"] == "event_type" and "event_type" not in columns:
        raise RecsysError(f"{source}: ctr.label_from=event_type but the file has no event type column")
    if spec["split"]["kind"] == "temporal" and not timed:
        raise RecsysError(
            "data config: a temporal split needs real timestamps; this source has only an order"
        )


def _as_string_map(mapping: pl.DataFrame, value: str) -> pl.DataFrame:
    return mapping.with_columns(pl.col(value).cast(pl.String))


def _write(work: Path, name: str, data: pl.DataFrame | pl.LazyFrame) -> str:
    """One output file, lz4 (~2x faster to write than zstd, a bit larger), in fixed row groups."""
    rows = SEQUENCE_ROW_GROUP_ROWS if name == fmt.SEQUENCES else ROW_GROUP_ROWS
    if isinstance(data, pl.LazyFrame):
        data.sink_parquet(work / name, compression="lz4", row_group_size=rows, engine="streaming")
    else:
        data.write_parquet(work / name, compression="lz4", row_group_size=rows)
    return name


def _attributes(
    work: Path,
    files: list[str],
    read: tuple[pl.Series, pl.DataFrame] | None,
    item_map: pl.DataFrame,
    path: Path | None,
) -> tuple[int, dict[str, Any] | None]:
    """Write the attribute map and per-item attribute lists; (n_attributes, manifest entry)."""
    if read is None or path is None:
        return 0, None
    attribute_map, table, info = attributes.build(*read, item_map, path)
    files.append(_write(work, fmt.ATTRIBUTE_MAP, attribute_map))
    files.append(_write(work, fmt.ITEM_ATTRIBUTES, table))
    return attribute_map.height, info


class _Counts:
    """A running sum of per-bucket (key, n) tables, folded in batches (memory O(distinct keys))."""

    def __init__(self, key: str, value: str) -> None:
        self.key, self.value = key, value
        self.parts: list[pl.DataFrame] = []
        self.waiting = 0

    def add(self, part: pl.DataFrame) -> None:
        self.parts.append(part)
        self.waiting += part.height
        if self.waiting > _FOLD_ROWS:
            self.fold()

    def fold(self) -> pl.DataFrame:
        if len(self.parts) != 1 or self.waiting:
            total = pl.concat(self.parts).group_by(self.key).agg(pl.col(self.value).sum())
            self.parts, self.waiting = [total], 0
        return self.parts[0]


class _Firsts:
    """Per-item statistics folded in bucket order: the first bucket's category, summed counts."""

    def __init__(self) -> None:
        self.parts: list[pl.DataFrame] = []
        self.waiting = 0

    def add(self, part: pl.DataFrame) -> None:
        self.parts.append(part)
        self.waiting += part.height
        if self.waiting > _FOLD_ROWS:
            self.fold()

    def fold(self) -> pl.DataFrame:
        total = (
            pl.concat(self.parts)
            .group_by("item_idx", maintain_order=True)
            .agg(pl.col("category_idx").first(), pl.col("count").sum())
        )
        self.parts, self.waiting = [total], 0
        return total


def _union(found: dict[str, list[pl.Series]], more: dict[str, pl.Series]) -> None:
    for key, values in more.items():
        parts = found.setdefault(key, [])
        parts.append(values)
        if len(parts) > 64:
            found[key] = [pl.concat(parts).unique()]


def _distinct(found: dict[str, list[pl.Series]], key: str) -> pl.Series:
    return pl.concat(found[key]).unique()


class _Stages:
    """The driver: runs each stage's tasks over the buckets and combines their results."""

    def __init__(
        self, run: _Run, ctx: tasks.Context, engine: engines.Local | engines.Ray, work: Path, target: Path
    ) -> None:
        self.run, self.ctx, self.engine, self.work, self.target = run, ctx, engine, work, target
        self.spec = run.spec
        self.trash = buckets.Trash()

    def _remove(self, kind: str, bucket: int, suffix: str = "") -> None:
        self.trash.discard(buckets.path(self.ctx.scratch, kind, bucket, suffix))

    # ---- 1. partition + clean

    def clean(self, source: buckets.Source, n_buckets: int, events: int) -> list[int]:
        spec, run, ctx = self.spec, self.run, self.ctx
        policy = spec["on_null"]
        null_users, null_user_rows, rows = 0, [], None
        if ctx.single:
            ids = [0]
        else:
            bounds = buckets.boundaries(source, n_buckets, events)
            part = buckets.partition(source, bounds, Path(ctx.scratch), events)
            rows, null_users, null_user_rows = part.rows, part.null_users, part.null_user_rows
            run.record("read", rows, rows, {})
            if null_users and policy == "error":  # the first check of all: no need to clean the buckets
                raise validate.null_error("user_id", null_users, null_user_rows, run.source, source.strings)
            ids = sorted(part.bucket_rows)
        nulls: dict[str, int] = {"user_id": null_users} if null_users else {}
        null_rows: dict[str, list[list[int]]] = {"user_id": [null_user_rows]}
        before: dict[str, int] = {}
        invalid: dict[str, int] = {}
        invalid_rows: dict[str, list[list[tuple[int, Any]]]] = {}
        total = {"duplicates": 0, "time_window": 0, "rows": 0}
        self.items = _Counts("item_id", "n")
        self.vocabulary: dict[str, list[pl.Series]] = {}
        self.kept: dict[int, int] = {}
        self.users: dict[int, int] = {}
        self.short_users = 0
        for r in self.engine.map(tasks.clean, [(ctx, b) for b in ids]):
            b = r["bucket"]
            if not ctx.single:
                for path in buckets.raw_parts(ctx.scratch, b):
                    self.trash.discard(path)
            total["rows"] += r["rows"]
            for col, n in r["nulls"].items():
                nulls[col] = nulls.get(col, 0) + n
                null_rows.setdefault(col, []).append(r["null_rows"].get(col, []))
            for col, n in r["invalid_before"].items():
                before[col] = before.get(col, 0) + n
                invalid[col] = invalid.get(col, 0) + r["invalid"].get(col, 0)
                invalid_rows.setdefault(col, []).append(r["invalid_rows"].get(col, []))
            if "kept" not in r:
                continue  # stopped at a null or invalid value (on_null=error)
            total["duplicates"] += r.get("duplicates", 0)
            total["time_window"] += r.get("time_window", 0)
            self.items.add(r["items"])
            _union(self.vocabulary, r["vocabulary"])
            if r["kept"]:
                self.kept[b], self.users[b] = r["kept"], r["users"]
                self.short_users += r["short_users"]
        if ctx.single:
            run.record("read", total["rows"], total["rows"], {})
        for col in validate.required_columns(spec, ctx.timed):  # the order one pass checks them in
            if nulls.get(col):
                if policy == "error":
                    first = buckets.first_rows(null_rows[col])
                    raise validate.null_error(col, nulls[col], first, run.source, source.strings)
                run.drop(f"null_{col}", f"null_{col}", nulls[col])
        for col in validate.INVALID:
            if before.get(col):
                if policy == "error":
                    first = buckets.first_rows(invalid_rows[col], key=lambda r: r[0])
                    raise validate.invalid_error(col, before[col], first, run.source, source.strings)
                reason = validate.INVALID[col][0]
                run.drop(reason, reason, invalid[col])
        if spec["duplicates"] != "keep":
            run.drop("duplicates", "duplicate", total["duplicates"])
        window = spec["time_window"]
        if window["start"] is not None or window["end"] is not None:
            run.drop("time_window", "out_of_time_window", total["time_window"])
        return [b for b in ids if b in self.kept]

    # ---- 2. frequency filter

    def kcore(self, live: list[int]) -> tuple[list[int], dict[str, Any] | None]:
        flt, run = self.spec["filter"], self.run
        min_user, min_item = flt["min_user"], flt["min_item"]
        if min_user <= 1 and min_item <= 1:
            return live, None
        counts = self.items.fold()
        fewest = counts.get_column("n").min()
        if (min_item <= 1 or fewest is None or fewest >= min_item) and not self.short_users:
            return live, None  # no item and no user under its threshold: no pass would drop a row
        gone_items = counts.get_column("item_id").head(0)
        dropped = {"min_item": 0, "min_user": 0}
        rounds = 0
        while True:
            rounds += 1
            rare = gone_items.head(0)
            if min_item > 1:
                rare = counts.filter(pl.col("n") < min_item).get_column("item_id")
            gone, new = self.engine.put(gone_items), self.engine.put(rare)
            calls = [(self.ctx, b, rounds, gone, new, min_user) for b in live]
            folded = _Counts("item_id", "n")
            changed = rare.len() > 0
            for r in self.engine.map(tasks.kcore_pass, calls):
                b = r["bucket"]
                if rounds > 1:
                    self._remove("gone-users", b, f"-{rounds - 1}")
                dropped["min_item"] += r["min_item"]
                dropped["min_user"] += r["min_user"]
                changed = changed or r["rare_users"] > 0
                folded.add(r["items"])
                self.kept[b], self.users[b] = r["kept"], r["users"]
            counts = folded.fold()
            gone_items = pl.concat([gone_items, rare])
            if not flt["iterative"] or not changed:
                break
        self.items = _Counts("item_id", "n")
        self.items.add(counts)
        if not sum(dropped.values()):
            return live, None
        run.record("filter", run.rows, run.rows - sum(dropped.values()), dropped)
        return [b for b in live if self.kept[b]], {"gone_items": gone_items, "rounds": rounds}

    # ---- 3./4. maps and index

    def maps(self, live: list[int], kcore: dict[str, Any] | None) -> tuple[tasks.Maps, list[str]]:
        spec, ctx = self.spec, self.ctx
        vocabulary = self.vocabulary
        if kcore is not None and any(c in ctx.columns for c in ("category", "event_type", "rating")):
            vocabulary = {}
            kc = self.engine.put(kcore)
            for found in self.engine.map(tasks.vocabulary_pass, [(ctx, b, kc) for b in live]):
                _union(vocabulary, found)
        item_map = steps.index_map(self.items.fold().get_column("item_id"), "item_idx", "item_id")
        category_map = None
        if "category" in ctx.columns:
            category_map = steps.index_map(_distinct(vocabulary, "category"), "category_idx", "category")
        names: list[str] = []
        if "event_type" in ctx.columns or spec["rating_events"]:
            present = pl.Series([], dtype=pl.String)
            if "event_type" in vocabulary:
                present = _distinct(vocabulary, "event_type")
            names = steps.event_type_names(present, spec["event_types"])
        return tasks.Maps(item=item_map, category=category_map, event_types=names), names

    def index(self, live: list[int], maps: tasks.Maps, kcore: dict[str, Any] | None) -> dict[str, Any]:
        offsets, offset = {}, 0
        for b in live:
            offsets[b], offset = offset, offset + self.users[b]
        shared, kc = self.engine.put(maps), self.engine.put(kcore)
        calls = [(self.ctx, b, offsets[b], shared, kc) for b in live]
        stats = _Firsts()
        out: dict[str, Any] = {"rows": 0, "users": offset, "positives": {}}
        out.update(samples=0, sample_positives=0)
        for r in self.engine.map(tasks.index, calls):
            b = r["bucket"]
            for kind in ("clean", "gone-users"):
                self._remove(kind, b, f"-{kcore['rounds']}" if kind == "gone-users" and kcore else "")
            out["rows"] += r["rows"]
            stats.add(r["items"])
            out["positives"][b] = r.get("positives", 0)
            out["samples"] += r.get("samples", 0)
            out["sample_positives"] += r.get("sample_positives", 0)
        out["item_stats"] = stats.fold()
        return out

    def negatives(self, live: list[int], items: pl.DataFrame, positives: dict[int, int]) -> tuple[int, int]:
        ctr = self.spec["ctr"]
        n_items, k = items.height, int(ctr["negatives"])
        if n_items < 2:
            raise RecsysError("ctr.negatives needs at least 2 items; set data.ctr.negatives=0")
        item_category = np.concatenate([[0], items.get_column("category_idx").fill_null(0).to_numpy()])
        rng = np.random.default_rng(int(ctr["seed"]))
        states = {}
        for b in live:  # where each bucket's draws start: after those of all positives before it
            states[b] = rng.bit_generator.state
            todo = positives[b] * k
            while todo:
                step = min(todo, 1 << 22)
                rng.integers(1, n_items, size=step)
                todo -= step
        shared = self.engine.put(item_category)
        samples = positive = 0
        for r in self.engine.map(tasks.negatives, [(self.ctx, b, shared, states[b]) for b in live]):
            samples += r["samples"]
            positive += r["sample_positives"]
        return samples, positive

    def parts(self, kind: str, live: list[int]) -> pl.LazyFrame:
        return pl.scan_ipc([buckets.path(self.ctx.scratch, kind, b) for b in live])

    def write_parts(self, files: list[str], name: str, kind: str, live: list[int]) -> None:
        files.append(_write(self.work, name, self.parts(kind, live)))
        for b in live:
            self._remove(kind, b)


def _run(
    spec: dict[str, Any],
    source_path: Path,
    work: Path,
    scratch: Path,
    engine: str = "local",
    requested: int | None = None,
    bucket_events: int = DEFAULT_BUCKET_EVENTS,
    target: Path | None = None,
    workers: int = engines.DEFAULT_WORKERS,
) -> dict[str, Any]:
    started = time.perf_counter()
    target = work if target is None else target
    run = _Run(spec, source_path)
    timed = has_timestamps(spec)
    # read (and checked) before the events, so a bad attributes file fails before the long work
    attribute_path = attributes.source(spec)
    attribute_pairs = None if attribute_path is None else attributes.read(attribute_path, spec)
    source = buckets.Source(source_path, spec, scratch)
    columns = source.schema().names()
    _check_columns(run, columns, timed)
    events = buckets.estimate_events(source_path, spec, source.plain)
    n_buckets = buckets.choose(requested, events, bucket_events)
    buckets.check_disk(work, events, target)
    ctx = tasks.Context(spec, str(source_path), str(scratch), timed, n_buckets == 1, tuple(columns))
    runner = engines.start(engine, target, workers)
    stages = _Stages(run, ctx, runner, work, target)
    try:
        body = _stages(stages, source, n_buckets, events, attribute_pairs)
    finally:
        stages.trash.close()
        runner.close()
    n_attributes, attribute_info, files = body.pop("_attributes")
    ctr_info = body.pop("ctr")
    return {
        **body,
        "has_timestamps": timed,
        "dropped": run.dropped,
        "steps": run.steps,
        "split": spec["split"],
        "ctr": ctr_info,
        "n_attributes": n_attributes,
        "item_attributes": attribute_info,
        "files": files,
        "prepare_seconds": round(time.perf_counter() - started, 3),
    }


class _Progress:
    """Logs each stage's time and this process's peak memory so far (the run's log file)."""

    def __init__(self, n_buckets: int, events: int, engine: str) -> None:
        self.last, self.cpu = time.perf_counter(), time.process_time()
        log.info("prepare: ~%s events in %d bucket(s), engine=%s", f"{events:,}", n_buckets, engine)

    def __call__(self, stage: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        wall, used = now - self.last, cpu - self.cpu
        log.info("prepare: %s %.1f s (CPU %.1f s), peak RSS so far %.0f MiB", stage, wall, used, peak)
        self.last, self.cpu = now, cpu


def _stages(
    stages: _Stages,
    source: buckets.Source,
    n_buckets: int,
    events: int,
    attribute_pairs: tuple[pl.Series, pl.DataFrame] | None,
) -> dict[str, Any]:
    spec, work = stages.spec, stages.work
    workers = getattr(stages.engine, "workers", None)
    done = _Progress(n_buckets, events, stages.engine.name + (f", workers={workers}" if workers else ""))
    live = stages.clean(source, n_buckets, events)
    done("partition + clean")
    live, kcore = stages.kcore(live)
    done("frequency filter")
    maps, names = stages.maps(live, kcore)
    indexed = stages.index(live, maps, kcore)
    done("maps + index")
    items = (
        _as_string_map(maps.item, "item_id")
        .lazy()
        .join(indexed["item_stats"].lazy(), on="item_idx", how="left")
        .sort("item_idx")
        .collect()
    )
    ctr_info = None
    if spec["ctr"] is not None:
        samples, positives = indexed["samples"], indexed["sample_positives"]
        if spec["ctr"]["negatives"] > 0:
            samples, positives = stages.negatives(live, items, indexed["positives"])
        ctr_info = {**spec["ctr"], "n_samples": samples, "n_positives": positives}
    files: list[str] = []
    stages.write_parts(files, fmt.INTERACTIONS, "interactions", live)
    stages.write_parts(files, fmt.SEQUENCES, "sequences", live)
    stages.write_parts(files, fmt.USER_MAP, "users", live)
    files.append(_write(work, fmt.ITEM_MAP, items))
    if maps.category is not None:
        files.append(_write(work, fmt.CATEGORY_MAP, _as_string_map(maps.category, "category")))
    attribute_path = attributes.source(spec)
    n_attributes, attribute_info = _attributes(work, files, attribute_pairs, maps.item, attribute_path)
    if spec["ctr"] is not None:
        stages.write_parts(files, fmt.CTR, "ctr", live)
    done("negatives + writing the outputs")
    return {
        "n_users": indexed["users"],
        "n_items": maps.item.height,
        "n_interactions": indexed["rows"],
        "n_categories": maps.category.height if maps.category is not None else 0,
        "n_event_types": len(names),
        "event_types": names,
        "ctr": ctr_info,
        "_attributes": (n_attributes, attribute_info, files),
    }


# The settings that say how `prepare` runs (not what it makes).
SCALE = Schema(
    Rule("engine", Choice(engines.ENGINES)),
    Rule("buckets", Int(1, 1 << 20, optional=True, example=16)),
    Rule("bucket_events", Int(1, example=DEFAULT_BUCKET_EVENTS)),
    Rule("workers", Int(1, 1024, example=engines.DEFAULT_WORKERS)),
)


def check_scale(
    engine: Any, n_buckets: Any, bucket_events: Any, workers: Any = engines.DEFAULT_WORKERS
) -> None:
    SCALE.validate(
        {"engine": engine, "buckets": n_buckets, "bucket_events": bucket_events, "workers": workers}
    )


def target_folder(
    spec: dict[str, Any], out_dir: Path | str | None, cache_dir: Path | str, cfg_hash: str | None = None
) -> Path:
    """`out_dir`, or the cache folder `<cache_dir>/<name>-<config hash>`."""
    if out_dir is not None:
        return Path(out_dir)
    return Path(cache_dir) / f"{spec['name']}-{cfg_hash or config_hash(spec, known_sources(cache_dir))}"


def prepare(
    cfg_data: DictConfig | dict[str, Any],
    out_dir: Path | str | None = None,
    cache_dir: Path | str = "data/cache",
    overwrite: bool = False,
    *,
    engine: str = "local",
    buckets: int | None = None,
    bucket_events: int = DEFAULT_BUCKET_EVENTS,
    workers: int = engines.DEFAULT_WORKERS,
) -> Path:
    """Prepare the data described by `cfg_data` and return the prepared folder.

    A folder already holding this config (same hash, sources unchanged by size and mtime) is reused
    without reading any data, unless `overwrite`. Writing goes to a temporary sibling folder that
    replaces the target only when complete; the buckets live inside it, so a killed run leaves no
    bucket that a later run could trust (the next run sweeps the folder away).

    `engine` runs the bucket tasks in this process ("local", `workers` buckets at a time) or as Ray
    tasks ("ray"); `buckets` fixes their number (None: one per `bucket_events` events of the input).
    None of these changes a byte of the output, so none is part of the config hash.
    """
    check_scale(engine, buckets, bucket_events, workers)
    spec = normalize(cfg_data)
    check_source(spec)  # before hashing them: a missing file is named as the config key that gives it
    # the sources' sha256 recorded by earlier runs: a cache hit hashes without reading the log
    cfg_hash = config_hash(spec, known_sources(cache_dir, out_dir))
    target = target_folder(spec, out_dir, cache_dir, cfg_hash)
    if not overwrite and reusable(target, cfg_hash):
        return target
    # runs that share a folder (a parallel sweep over one cache) prepare it once: the second waits,
    # then reuses it; replacing it would pull it (and the sequence store being built in it) from
    # under the first
    with exclusive(target):
        if not overwrite and reusable(target, cfg_hash):
            return target
        return _prepare_into(target, spec, cfg_hash, cache_dir, engine, buckets, bucket_events, workers)


def _prepare_into(
    target: Path,
    spec: dict[str, Any],
    cfg_hash: str,
    cache_dir: Path | str,
    engine: str,
    buckets: int | None,
    bucket_events: int,
    workers: int,
) -> Path:
    with atomic_folder(target) as work:
        scratch = work / "_scratch"
        scratch.mkdir()
        if spec["format"] == "synthetic":
            source = synthetic.ensure_log(spec["synthetic"], Path(cache_dir))
        else:
            source = Path(spec["path"]).expanduser()
        body = _run(spec, source, work, scratch, engine, buckets, bucket_events, target, workers)
        shutil.rmtree(scratch)
        manifest = {
            "format_version": fmt.FORMAT_VERSION,
            "name": spec["name"],
            "config": spec,
            "config_hash": cfg_hash,
            "sources": [describe_source(p) for p in (source, attributes.source(spec)) if p is not None],
            **body,
            "package_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (work / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return target
