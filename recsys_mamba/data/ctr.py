"""CTR samples: every labelled event at its own position, plus optional seeded sampled negatives."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_mamba.errors import RecsysError

CTR_COLUMNS = [
    "user_idx",
    "item_idx",
    "category_idx",
    "label",
    "timestamp",
    "hist_len",
    "split",
    "sampled_negative",
]


def event_samples(interactions: pl.LazyFrame, implicit: bool) -> pl.LazyFrame:
    """One sample per event; `hist_len` is its position in the user's sequence. Implicit logs
    (no labels) make every event a positive."""
    label = pl.lit(1, dtype=pl.Int8) if implicit else pl.col("label")
    return interactions.select(
        "user_idx",
        "item_idx",
        "category_idx",
        label.alias("label"),
        "timestamp",
        pl.int_range(pl.len(), dtype=pl.Int32).over("user_idx").alias("hist_len"),
        "split",
        pl.lit(False).alias("sampled_negative"),
    )


def sampled_negatives(
    samples: pl.DataFrame,
    item_category: np.ndarray,
    k: int,
    seed: int,
    rng: np.random.Generator | None = None,
) -> pl.DataFrame:
    """`k` negatives per positive, items uniform over all items except the positive one, drawn with
    a fixed seed (or from `rng`, a stream some earlier samples already drew from); each shares its
    positive's position, timestamp and split."""
    n_items = len(item_category) - 1
    if n_items < 2:
        raise RecsysError("ctr.negatives needs at least 2 items; set data.ctr.negatives=0")
    pos = samples.filter(pl.col("label") == 1)
    rng = np.random.default_rng(seed) if rng is None else rng
    rows = np.repeat(np.arange(pos.height), k)
    base = pos.get_column("item_idx").to_numpy()[rows].astype(np.int64)
    items = (base - 1 + rng.integers(1, n_items, size=rows.size)) % n_items + 1
    return pos[rows].with_columns(
        pl.Series("item_idx", items, dtype=pl.Int32),
        pl.Series("category_idx", item_category[items], dtype=pl.Int32),
        pl.lit(0, dtype=pl.Int8).alias("label"),
        pl.lit(True).alias("sampled_negative"),
    )


def build(
    interactions: pl.LazyFrame, item_category: np.ndarray, ctr: dict, rng: np.random.Generator | None = None
) -> pl.DataFrame:
    """The ctr.parquet frame: event samples, then negatives right after their positive (drawn from
    `rng` when given, else from a generator seeded with ctr.seed)."""
    samples = event_samples(interactions, implicit=ctr["label_from"] == "none").collect()
    if ctr["negatives"] <= 0:
        return samples
    negatives = sampled_negatives(samples, item_category, int(ctr["negatives"]), int(ctr["seed"]), rng)
    return pl.concat([samples, negatives]).sort(
        ["user_idx", "hist_len", "sampled_negative"], maintain_order=True
    )
