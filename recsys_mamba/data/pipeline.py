"""Files in, Parquet + manifest out: the `prepare` pipeline (output contract: `recsys_mamba.data.format`).

Reading is lazy (Polars scans, streaming engine); the cleaned events are materialised once per
dropping step so every dropped row is counted by reason in the manifest.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from omegaconf import DictConfig

from recsys_mamba.data import attributes, readers, splits, steps, synthetic, validate
from recsys_mamba.data import ctr as ctr_samples
from recsys_mamba.data import format as fmt
from recsys_mamba.data.cache import atomic_folder, describe_source, reusable
from recsys_mamba.data.spec import config_hash, normalize
from recsys_mamba.errors import RecsysError
from recsys_mamba.version import __version__


class _Run:
    """Materialises each step and keeps the per-step row counts and drop reasons."""

    def __init__(self, spec: dict[str, Any], source: Path) -> None:
        self.spec, self.source = spec, source
        self.engine = "streaming" if spec["engine"] == "streaming" else "in-memory"
        self.steps: list[dict[str, Any]] = []
        self.dropped: dict[str, int] = {}
        self.strings: validate.StringsRead | None = None  # the source re-read as strings, for messages

    def collect(self, lf: pl.LazyFrame, every_field: bool = False) -> pl.DataFrame:
        # with projection pushdown polars skips the fields no column needs, and with them the check
        # that a line has no more fields than the header
        flags = pl.QueryOptFlags(projection_pushdown=False) if every_field else pl.QueryOptFlags()
        return lf.collect(engine=self.engine, optimizations=flags)

    def step(
        self, name: str, df: pl.DataFrame, fn: Callable[[pl.LazyFrame], pl.LazyFrame], reason: str
    ) -> pl.DataFrame:
        out = self.collect(fn(df.lazy()))
        self.record(name, df.height, out.height, {reason: df.height - out.height})
        return out

    def record(self, name: str, rows_in: int, rows_out: int, dropped: dict[str, int]) -> None:
        self.steps.append({"step": name, "rows_in": rows_in, "rows_out": rows_out})
        for reason, n in dropped.items():
            if n:
                self.dropped[reason] = self.dropped.get(reason, 0) + n
        validate.check_not_empty(rows_out, self.source, f"step {name!r}")


def has_timestamps(spec: dict[str, Any]) -> bool:
    if spec["format"] in readers.POSITIONAL:
        return False
    if spec["format"] in ("movielens", "taobao"):
        return True
    return spec["columns"].get("timestamp") is not None


def _read(run: _Run, scratch: Path) -> pl.DataFrame:
    spec, source = run.spec, run.source
    run.strings = functools.partial(readers.read, source, spec, scratch, strings=True)
    try:
        lf = readers.read(source, spec, scratch)
        plain = readers.local_text(source, scratch)
        # one chunk per column: the sort's gather and later steps are much slower across chunks
        df = run.collect(lf, every_field=readers.layout(spec, plain) is not None).rechunk()
    except validate.READ_ERRORS as err:
        raise validate.diagnose(run.strings, spec, source, err, readers.local_text(source, scratch)) from None
    run.record("read", df.height, df.height, {})
    return df


def _clean(run: _Run, df: pl.DataFrame, timed: bool) -> pl.DataFrame:
    spec = run.spec
    for col in validate.required_columns(spec, timed):
        if col not in df.columns:
            raise RecsysError(
                f"{run.source}: the data config needs column {col!r} (for ctr.label_from or timestamps) "
                f"but the file has none; map it with data.columns.{col}=<name> or change data.ctr"
            )
        counts = validate.null_counts(df, [col])
        if counts:  # raises for on_null=error
            step = functools.partial(
                validate.handle_nulls,
                columns=[col],
                counts=counts,
                policy=spec["on_null"],
                source=run.source,
                strings=run.strings,
            )
            df = run.step(f"null_{col}", df, step, f"null_{col}")
    for col, n in validate.invalid_counts(df, timed).items():  # raises for on_null=error
        step = functools.partial(
            validate.handle_invalid,
            col=col,
            n=n,
            policy=spec["on_null"],
            source=run.source,
            strings=run.strings,
        )
        reason = validate.INVALID[col][0]
        df = run.step(reason, df, step, reason)
    if "timestamp" not in df.columns:
        df = run.collect(steps.positional_timestamps(df.lazy()))
    # the in-memory engine sorts faster than the streaming one; the frame is in memory already
    df = steps.chrono_sort(df.lazy()).drop("_row").collect(engine="in-memory")
    if spec["duplicates"] != "keep":
        df = run.step("duplicates", df, lambda lf: steps.deduplicate(lf, spec["duplicates"]), "duplicate")
    window = spec["time_window"]
    if window["start"] is not None or window["end"] is not None:
        if not timed:
            raise RecsysError(
                "data config: data.time_window needs real timestamps; this source has only an order"
            )
        df = run.step(
            "time_window",
            df,
            lambda lf: steps.time_window(lf, window["start"], window["end"]),
            "out_of_time_window",
        )
    flt = spec["filter"]
    lf, dropped = steps.kcore(df.lazy(), flt["min_user"], flt["min_item"], flt["iterative"])
    if sum(dropped.values()):
        out = run.collect(lf)
        run.record("filter", df.height, out.height, dropped)
        df = out
    return df


def _as_string_map(mapping: pl.DataFrame, value: str) -> pl.DataFrame:
    return mapping.with_columns(pl.col(value).cast(pl.String))


def _index(run: _Run, df: pl.DataFrame, maps: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, list[str]]:
    """Replace original ids, categories and event types by contiguous indices (0 = none)."""
    if run.spec["rating_events"]:
        if "rating" not in df.columns:
            raise RecsysError(
                f"{run.source}: data.rating_events=true but the file has no rating column; "
                "set data.columns.rating (or data.rating_events=false)"
            )
        # Each past rating becomes an event type ("rating=4"), so an encoder sees the feedback given
        # on the history, not only which items were rated.
        df = df.with_columns(pl.format("rating={}", pl.col("rating").round(1)).alias("event_type"))
    maps["user"] = steps.index_map(df.get_column("user_id"), "user_idx", "user_id")
    maps["item"] = steps.index_map(df.get_column("item_id"), "item_idx", "item_id")
    lf = steps.encode(steps.user_index(df.lazy()), "item_id", maps["item"], "item_idx")
    if "category" in df.columns:
        maps["category"] = steps.index_map(df.get_column("category"), "category_idx", "category")
        lf = steps.encode(lf, "category", maps["category"], "category_idx")
    names: list[str] = []
    if "event_type" in df.columns:
        names = steps.event_type_names(df.get_column("event_type"), run.spec["event_types"])
        lf = steps.encode_names(lf, "event_type", names, "event_type_idx")
    return run.collect(lf), names


def _interactions(run: _Run, df: pl.DataFrame, timed: bool) -> pl.DataFrame:
    spec = run.spec
    ctr = spec["ctr"]
    if ctr and ctr["label_from"] == "event_type" and "event_type" not in df.columns:
        raise RecsysError(f"{run.source}: ctr.label_from=event_type but the file has no event type column")
    if ctr is not None or "label" not in df.columns:
        df = df.lazy().pipe(steps.click_labels, ctr).collect()
    lf = splits.assign(df.lazy(), spec["split"], timed)
    defaults = {"category_idx": pl.Int32, "event_type_idx": pl.Int32, "rating": pl.Float32}
    lf = lf.with_columns(
        pl.lit(None if c == "rating" else 0, dtype=t).alias(c)
        for c, t in defaults.items()
        if c not in df.columns
    )
    return run.collect(lf.select(pl.col(c).cast(t) for c, t in fmt.INTERACTIONS_SCHEMA.items()))


def _item_table(inter: pl.DataFrame, item_map: pl.DataFrame) -> pl.DataFrame:
    stats = (
        inter.lazy()
        .group_by("item_idx")
        .agg(
            pl.col("category_idx").first(),
            (pl.col("split") == fmt.SPLIT_TRAIN).sum().cast(pl.Int64).alias("count"),
        )
    )
    return (
        _as_string_map(item_map, "item_id")
        .lazy()
        .join(stats, on="item_idx", how="left")
        .sort("item_idx")
        .collect()
    )


def _write(work: Path, name: str, df: pl.DataFrame) -> str:
    df.write_parquet(work / name, compression="lz4")  # ~2x faster to write than zstd, a bit larger
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


def _run(spec: dict[str, Any], source: Path, work: Path, scratch: Path) -> dict[str, Any]:
    started = time.perf_counter()
    run = _Run(spec, source)
    timed = has_timestamps(spec)
    # read (and checked) before the events, so a bad attributes file fails before the long work
    attribute_path = attributes.source(spec)
    attribute_pairs = None if attribute_path is None else attributes.read(attribute_path, spec)
    df = _clean(run, _read(run, scratch), timed)
    maps: dict[str, pl.DataFrame] = {}
    df, event_names = _index(run, df, maps)
    inter = _interactions(run, df, timed)
    del df
    files = [_write(work, fmt.INTERACTIONS, inter)]
    seqs = steps.build_sequences(inter, fmt.SEQUENCE_COLUMNS)
    files.append(_write(work, fmt.SEQUENCES, seqs))
    del seqs
    files.append(_write(work, fmt.USER_MAP, _as_string_map(maps["user"], "user_id")))
    items = _item_table(inter, maps["item"])
    files.append(_write(work, fmt.ITEM_MAP, items))
    if "category" in maps:
        files.append(_write(work, fmt.CATEGORY_MAP, _as_string_map(maps["category"], "category")))
    n_attributes, attribute_info = _attributes(work, files, attribute_pairs, maps["item"], attribute_path)
    del attribute_pairs
    ctr_info = None
    if spec["ctr"] is not None:
        item_category = np.concatenate([[0], items.get_column("category_idx").fill_null(0).to_numpy()])
        samples = ctr_samples.build(inter.lazy(), item_category, spec["ctr"])
        files.append(_write(work, fmt.CTR, samples))
        ctr_info = {**spec["ctr"], "n_samples": samples.height, "n_positives": int(samples["label"].sum())}
    return {
        "n_users": maps["user"].height,
        "n_items": maps["item"].height,
        "n_interactions": inter.height,
        "n_categories": maps["category"].height if "category" in maps else 0,
        "n_event_types": len(event_names),
        "event_types": event_names,
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


def target_folder(spec: dict[str, Any], out_dir: Path | str | None, cache_dir: Path | str) -> Path:
    """`out_dir`, or the cache folder `<cache_dir>/<name>-<config hash>`."""
    if out_dir is not None:
        return Path(out_dir)
    return Path(cache_dir) / f"{spec['name']}-{config_hash(spec)}"


def prepare(
    cfg_data: DictConfig | dict[str, Any],
    out_dir: Path | str | None = None,
    cache_dir: Path | str = "data/cache",
    overwrite: bool = False,
) -> Path:
    """Prepare the data described by `cfg_data` and return the prepared folder.

    A folder already holding this config (same hash, sources unchanged by size and mtime) is reused
    without reading any data, unless `overwrite`. Writing goes to a temporary sibling folder that
    replaces the target only when complete.
    """
    spec = normalize(cfg_data)
    cfg_hash = config_hash(spec)
    target = target_folder(spec, out_dir, cache_dir)
    if not overwrite and reusable(target, cfg_hash):
        return target
    with atomic_folder(target) as work:
        scratch = work / "_scratch"
        scratch.mkdir()
        if spec["format"] == "synthetic":
            source = synthetic.ensure_log(spec["synthetic"], Path(cache_dir))
        else:
            source = Path(spec["path"]).expanduser()
        body = _run(spec, source, work, scratch)
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
