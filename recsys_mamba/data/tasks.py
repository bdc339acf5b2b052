"""The per-bucket work of `prepare`, as plain functions of files and small arguments.

Each runs in the driver process (engine=local) or as a Ray task (engine=ray) and returns a small
result (counts, first offending rows, per-item tables); bigger outputs go to files under the run's
scratch folder, each under a name of its own, written to a temporary name and renamed. A task that
dies and is run again therefore starts over from its inputs and leaves the same files.

Stages, in order (the driver, `recsys_mamba.data.pipeline`, runs each over all buckets and combines
the results between them):
1. `clean`: null and invalid values, positional timestamps, chronological sort, duplicates, time window.
2. `kcore_pass`: one round of the item / user frequency filter (repeated while something drops).
3. `vocabulary`: categories and event types of the kept events (only when the filter dropped some).
4. `index`: ids -> indices, labels, splits, sequences, CTR samples without sampled negatives.
5. `negatives`: CTR sampled negatives, from a random stream that continues across buckets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_mamba.data import buckets, splits, steps, validate
from recsys_mamba.data import ctr as ctr_samples
from recsys_mamba.data import format as fmt
from recsys_mamba.data.buckets import path as part_path
from recsys_mamba.data.buckets import read_ipc, write_ipc

_SHOW = 5
FAILPOINTS = "RECSYS_PREPARE_FAILPOINTS"


@dataclass(frozen=True)
class Context:
    """What every task of one `prepare` run shares."""

    spec: dict[str, Any]
    source: str  # the event file (a single bucket reads it directly)
    scratch: str  # the run's scratch folder; intermediate files live in its buckets/ folder
    timed: bool  # the source has real timestamps
    single: bool  # one bucket: no partition files
    columns: tuple[str, ...]  # the standard columns the source has

    @property
    def engine(self) -> str:  # the polars engine, as the data config asks
        return "streaming" if self.spec["engine"] == "streaming" else "in-memory"

    def collect(self, lf: pl.LazyFrame) -> pl.DataFrame:
        return lf.collect(engine=self.engine)


def failpoint(task: str, bucket: int) -> None:
    """Test hook: the process dies (as a killed worker does) when `$RECSYS_PREPARE_FAILPOINTS/<task>-<bucket>`
    exists, once (the file is consumed) or, for `<task>-<bucket>.always`, every time."""
    root = os.environ.get(FAILPOINTS)
    if not root:
        return
    armed = Path(root) / f"{task}-{bucket}"
    if armed.with_suffix(".always").exists():
        os._exit(70)
    try:
        os.replace(armed, armed.with_name(f"{armed.name}.fired-{os.getpid()}"))
    except OSError:
        return
    os._exit(70)


# ---- 1. clean --------------------------------------------------------------------------------------


def clean(ctx: Context, bucket: int) -> dict[str, Any]:
    """Nulls, invalid values, chronological order, duplicates and the time window of one bucket.

    With data.on_null=error a bucket holding a null or invalid value stops there and returns its
    first offending rows: the driver raises for the first column, over all buckets, as one read
    of the whole log would."""
    failpoint("clean", bucket)
    spec, policy = ctx.spec, ctx.spec["on_null"]
    if ctx.single:
        df = buckets.Source(Path(ctx.source), spec, Path(ctx.scratch)).collect(ctx.engine)
    else:
        df = pl.concat([read_ipc(p) for p in buckets.raw_parts(ctx.scratch, bucket)], rechunk=True)
    out: dict[str, Any] = {"bucket": bucket, "rows": df.height, "nulls": {}, "null_rows": {}}
    out.update(invalid_before={}, invalid={}, invalid_rows={})
    for col in validate.required_columns(spec, ctx.timed):
        n = df.get_column(col).null_count() if col in df.columns else 0
        if not n:
            continue
        out["nulls"][col] = n
        if policy == "error":
            out["null_rows"][col] = df.filter(pl.col(col).is_null()).get_column("_row").head(_SHOW).to_list()
        else:
            df = df.filter(pl.col(col).is_not_null())
    if policy == "error" and out["nulls"]:
        return out
    for col, n in validate.invalid_counts(df, ctx.timed).items():
        flagged = validate.INVALID[col][1].fill_null(False)
        out["invalid_before"][col] = n
        if policy == "error":
            out["invalid_rows"][col] = df.filter(flagged).select("_row", col).head(_SHOW).rows()
        else:
            before = df.height
            df = df.filter(~flagged)
            out["invalid"][col] = before - df.height
    if policy == "error" and out["invalid_before"]:
        return out
    if "timestamp" not in df.columns:
        df = ctx.collect(steps.positional_timestamps(df.lazy()))
    # the in-memory engine sorts faster than the streaming one; the frame is in memory already
    df = steps.chrono_sort(df.lazy(), keep_row=False).collect(engine="in-memory")
    if spec["duplicates"] != "keep":
        before = df.height
        df = ctx.collect(steps.deduplicate(df.lazy(), spec["duplicates"]))
        out["duplicates"] = before - df.height
    window = spec["time_window"]
    if window["start"] is not None or window["end"] is not None:
        before = df.height
        df = ctx.collect(steps.time_window(df.lazy(), window["start"], window["end"]))
        out["time_window"] = before - df.height
    out["kept"] = df.height
    # the rows are sorted by user: one run per user, whose lengths the frequency filter needs first
    runs = df.get_column("user_id").rle().struct.field("len")
    out["users"] = runs.len()
    out["short_users"] = int((runs < spec["filter"]["min_user"]).sum())
    out["items"] = item_counts(df)
    out["vocabulary"] = vocabulary(df, spec)
    if df.height:
        write_ipc(df, part_path(ctx.scratch, "clean", bucket))
    return out


def item_counts(df: pl.DataFrame) -> pl.DataFrame:
    return df.group_by("item_id").agg(pl.len().cast(pl.Int64).alias("n"))


def rating_event_types(df: pl.DataFrame) -> pl.Expr:
    """Each past rating as an event type ("rating=4.0"), so an encoder sees the feedback given on the
    history, not only which items were rated."""
    return pl.format("rating={}", pl.col("rating").round(1)).alias("event_type")


def _own(values: pl.Series) -> pl.Series:
    """Distinct values copied to memory of their own: the result of `unique` can keep its whole source
    column alive, and the driver holds one result per bucket until the last (BENCHMARKS.md)."""
    return pl.Series(values.name, values.to_list(), dtype=values.dtype)


def vocabulary(df: pl.DataFrame, spec: dict[str, Any]) -> dict[str, pl.Series]:
    """Distinct categories and event types of `df` (nulls left out; the distinct values are found
    before they are formatted or cast, which would otherwise touch every row)."""
    out: dict[str, pl.Series] = {}
    if "category" in df.columns:
        out["category"] = _own(df.get_column("category").drop_nulls().unique())
    if spec["rating_events"] and "rating" in df.columns:
        ratings = df.select(pl.col("rating").drop_nulls().unique())
        out["event_type"] = ratings.select(rating_event_types(ratings)).to_series().unique()
    elif "event_type" in df.columns:
        out["event_type"] = df.get_column("event_type").drop_nulls().unique().cast(pl.String)
    return out


# ---- 2. k-core -----------------------------------------------------------------------------------


def _gone_users(ctx: Context, bucket: int, iteration: int) -> pl.Series | None:
    """The users the filter dropped from `bucket` up to `iteration` (None before the first)."""
    if iteration < 1:
        return None
    return read_ipc(part_path(ctx.scratch, "gone-users", bucket, f"-{iteration}")).get_column("user_id")


def kept(ctx: Context, bucket: int, columns: list[str] | None, kcore: dict[str, Any] | None) -> pl.DataFrame:
    """The cleaned events of `bucket` the frequency filter keeps (`kcore`: gone items and the last round)."""
    df = read_ipc(part_path(ctx.scratch, "clean", bucket), columns)
    if kcore is None:
        return df
    users = _gone_users(ctx, bucket, kcore["rounds"])
    keep = pl.lit(True)
    if users is not None and users.len():
        keep = keep & ~pl.col("user_id").is_in(users.implode())
    if kcore["gone_items"].len():
        keep = keep & ~pl.col("item_id").is_in(kcore["gone_items"].implode())
    return df.filter(keep)


def kcore_pass(
    ctx: Context, bucket: int, iteration: int, gone_items: pl.Series, rare_items: pl.Series, min_user: int
) -> dict[str, Any]:
    """One round of `steps.kcore` on one bucket: drop `rare_items` (rare over all buckets, found by the
    driver), then this bucket's users with fewer than `min_user` events left (a user's events are all
    in one bucket). Returns the rows each drop removed and the item counts left, for the next round."""
    failpoint("kcore", bucket)
    pairs = read_ipc(part_path(ctx.scratch, "clean", bucket), ["user_id", "item_id"])
    users = _gone_users(ctx, bucket, iteration - 1)
    keep = pl.lit(True)
    if users is not None and users.len():
        keep = keep & ~pl.col("user_id").is_in(users.implode())
    if gone_items.len():
        keep = keep & ~pl.col("item_id").is_in(gone_items.implode())
    pairs = pairs.filter(keep)
    before = pairs.height
    if rare_items.len():
        pairs = pairs.filter(~pl.col("item_id").is_in(rare_items.implode()))
    out = {"bucket": bucket, "min_item": before - pairs.height}
    rare = steps.rare_values(pairs.lazy(), "user_id", min_user)
    before = pairs.height
    if rare.len():
        pairs = pairs.filter(~pl.col("user_id").is_in(rare.implode()))
    out.update(min_user=before - pairs.height, rare_users=rare.len(), kept=pairs.height)
    out["users"] = pairs.get_column("user_id").n_unique() if pairs.height else 0
    out["items"] = item_counts(pairs)
    gone = rare if users is None else pl.concat([users, rare])
    write_ipc(gone.to_frame("user_id"), part_path(ctx.scratch, "gone-users", bucket, f"-{iteration}"))
    return out


def vocabulary_pass(ctx: Context, bucket: int, kcore: dict[str, Any]) -> dict[str, pl.Series]:
    """Categories and event types of the events the frequency filter kept."""
    failpoint("vocabulary", bucket)
    wanted = [c for c in ("user_id", "item_id", "category", "event_type", "rating") if c in ctx.columns]
    return vocabulary(kept(ctx, bucket, wanted, kcore), ctx.spec)


# ---- 4. index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Maps:
    """The global tables every bucket is indexed with."""

    item: pl.DataFrame  # item_idx, item_id (typed)
    category: pl.DataFrame | None  # category_idx, category
    event_types: list[str]


def index(
    ctx: Context, bucket: int, user_offset: int, maps: Maps, kcore: dict[str, Any] | None
) -> dict[str, Any]:
    """Indices, labels and splits of one bucket's kept events; writes its interactions, sequences,
    user map and (without sampled negatives) CTR parts. Returns per-item training counts and the
    category of each item's first event, for the item table."""
    failpoint("index", bucket)
    spec = ctx.spec
    df = kept(ctx, bucket, None, kcore)
    if spec["rating_events"]:
        df = df.with_columns(rating_event_types(df))
    users = df.get_column("user_id").unique(maintain_order=True)  # sorted: the rows are
    user_map = pl.DataFrame(
        {
            "user_idx": pl.int_range(
                user_offset + 1, user_offset + users.len() + 1, dtype=pl.Int32, eager=True
            ),
            "user_id": users.cast(pl.String),
        }
    )
    lf = steps.user_index(df.lazy()).with_columns((pl.col("user_idx") + user_offset).cast(pl.Int32))
    lf = steps.encode(lf, "item_id", maps.item, "item_idx")
    if maps.category is not None:
        lf = steps.encode(lf, "category", maps.category, "category_idx")
    if "event_type" in df.columns:
        lf = steps.encode_names(lf, "event_type", maps.event_types, "event_type_idx")
    df = ctx.collect(lf)
    inter = interactions(ctx, df)
    del df
    write_ipc(inter, part_path(ctx.scratch, "interactions", bucket))
    write_ipc(steps.build_sequences(inter, fmt.SEQUENCE_COLUMNS), part_path(ctx.scratch, "sequences", bucket))
    write_ipc(user_map, part_path(ctx.scratch, "users", bucket))
    out: dict[str, Any] = {"bucket": bucket, "rows": inter.height, "users": users.len()}
    out["items"] = item_stats(inter)
    ctr = spec["ctr"]
    if ctr is not None:
        implicit = ctr["label_from"] == "none"
        out["positives"] = inter.height if implicit else int((inter.get_column("label") == 1).sum())
        if ctr["negatives"] <= 0:
            samples = ctr_samples.build(inter.lazy(), np.zeros(1, dtype=np.int64), ctr)
            write_ipc(samples, part_path(ctx.scratch, "ctr", bucket))
            out["samples"] = samples.height
            out["sample_positives"] = int(samples.get_column("label").sum())
    return out


def item_stats(inter: pl.DataFrame) -> pl.DataFrame:
    """Per item of `inter`: the category of its first row and its training rows. The indices are
    dense, so the counts are a bincount (a group-by over the rows costs ~4x as much)."""
    firsts = inter.select("item_idx", "category_idx").filter(pl.col("item_idx").is_first_distinct())
    train = (inter.get_column("split") == fmt.SPLIT_TRAIN).to_numpy()
    counts = np.bincount(inter.get_column("item_idx").to_numpy(), weights=train)
    at = firsts.get_column("item_idx").to_numpy()
    return firsts.with_columns(pl.Series("count", counts[at].astype(np.int64)))


def interactions(ctx: Context, df: pl.DataFrame) -> pl.DataFrame:
    """Click labels, the split and the columns of the interactions contract."""
    spec = ctx.spec
    ctr = spec["ctr"]
    if ctr is not None or "label" not in df.columns:
        df = df.lazy().pipe(steps.click_labels, ctr).collect()
    lf = splits.assign(df.lazy(), spec["split"], ctx.timed)
    defaults = {"category_idx": pl.Int32, "event_type_idx": pl.Int32, "rating": pl.Float32}
    lf = lf.with_columns(
        pl.lit(None if c == "rating" else 0, dtype=t).alias(c)
        for c, t in defaults.items()
        if c not in df.columns
    )
    return ctx.collect(lf.select(pl.col(c).cast(t) for c, t in fmt.INTERACTIONS_SCHEMA.items()))


# ---- 5. sampled negatives ------------------------------------------------------------------------


def negatives(ctx: Context, bucket: int, item_category: np.ndarray, state: dict[str, Any]) -> dict[str, Any]:
    """CTR samples of one bucket with sampled negatives, drawn from the random stream at `state` (where
    the buckets before it left it), so the draws are those of one pass over all positives."""
    failpoint("negatives", bucket)
    ctr = ctx.spec["ctr"]
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    inter = read_ipc(part_path(ctx.scratch, "interactions", bucket))
    samples = ctr_samples.build(inter.lazy(), item_category, ctr, rng=rng)
    write_ipc(samples, part_path(ctx.scratch, "ctr", bucket))
    return {"bucket": bucket, "samples": samples.height, "sample_positives": int(samples["label"].sum())}
