from __future__ import annotations

import numpy as np
import polars as pl

from recsys_mamba.data import ctr


def _inter() -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "user_idx": pl.Series([1, 1, 1, 2, 2], dtype=pl.Int32),
            "item_idx": pl.Series([1, 2, 3, 2, 4], dtype=pl.Int32),
            "category_idx": pl.Series([1, 1, 2, 1, 2], dtype=pl.Int32),
            "label": pl.Series([1, 0, 1, 1, None], dtype=pl.Int8),
            "timestamp": [10, 20, 30, 5, 6],
            "split": pl.Series([0, 1, 2, 0, 0], dtype=pl.Int8),
        }
    )


ITEM_CATEGORY = np.array([0, 1, 1, 2, 2])  # index = item_idx


def test_event_samples_positions():
    out = ctr.event_samples(_inter(), implicit=False).collect()
    assert out.columns == ctr.CTR_COLUMNS
    assert out["hist_len"].to_list() == [0, 1, 2, 0, 1]
    assert out["label"].to_list() == [1, 0, 1, 1, None]
    assert ctr.event_samples(_inter(), implicit=True).collect()["label"].to_list() == [1] * 5


def test_sampled_negatives_are_seeded_and_share_position():
    cfg = {"label_from": "label", "negatives": 3, "seed": 7}
    a = ctr.build(_inter(), ITEM_CATEGORY, cfg)
    b = ctr.build(_inter(), ITEM_CATEGORY, cfg)
    assert a.equals(b)
    neg = a.filter(pl.col("sampled_negative"))
    assert neg.height == 3 * 3 and (neg["label"] == 0).all()
    pos = a.filter(~pl.col("sampled_negative") & (pl.col("label") == 1))
    joined = neg.join(pos, on=["user_idx", "hist_len"], suffix="_pos")
    assert joined.height == neg.height
    assert (joined["item_idx"] != joined["item_idx_pos"]).all()
    assert (joined["timestamp"] == joined["timestamp_pos"]).all() and (
        joined["split"] == joined["split_pos"]
    ).all()
    assert (neg["category_idx"].to_numpy() == ITEM_CATEGORY[neg["item_idx"].to_numpy()]).all()
    assert a["user_idx"].is_sorted() and not a.equals(ctr.build(_inter(), ITEM_CATEGORY, {**cfg, "seed": 8}))
