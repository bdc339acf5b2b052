from __future__ import annotations

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from recsys_mamba.config import compose
from recsys_mamba.data import format as fmt
from recsys_mamba.data import load_manifest, prepare, synthetic

SMALL = {"n_users": 300, "n_items": 200, "mean_events": 30}


def test_same_seed_same_log():
    a = synthetic.generate({**SMALL, "seed": 3})
    assert a.equals(synthetic.generate({**SMALL, "seed": 3}))
    assert not a.equals(synthetic.generate({**SMALL, "seed": 4}))


def test_log_shape():
    log = synthetic.generate(SMALL)
    assert log.columns == ["user_id", "item_id", "category", "event_type", "label", "timestamp"]
    assert log["timestamp"].is_sorted()
    assert set(log["event_type"].unique()) <= set(synthetic.EVENT_TYPES)
    clicked = log.filter(pl.col("label") == 1)["event_type"]
    assert "expose" not in set(clicked) and (log.filter(pl.col("label") == 0)["event_type"] == "expose").all()
    assert 0.2 < log["label"].mean() < 0.6
    # power-law popularity: the top 5% of items get far more than 5% of the impressions
    counts = log.group_by("item_id").len().sort("len", descending=True)["len"]
    assert counts.head(len(counts) // 20).sum() > 0.2 * counts.sum()


def test_log_is_cached(tmp_path):
    path = synthetic.ensure_log(SMALL, tmp_path)
    stamp = path.stat().st_mtime_ns
    assert synthetic.ensure_log(SMALL, tmp_path) == path and path.stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = compose("prepare", ["data=synthetic"]).data
    return prepare(cfg, None, tmp_path_factory.mktemp("cache"))


def test_default_config_size(prepared):
    m = load_manifest(prepared)
    assert 2000 <= m["n_users"] <= 5000 and 1000 <= m["n_items"] <= 3000
    assert 100_000 <= m["n_interactions"] <= 300_000
    assert m["event_types"] == synthetic.EVENT_TYPES and m["ctr"]["n_positives"] > 0


def test_clicks_follow_interest_not_popularity(prepared):
    """A category-affinity heuristic from the user's earlier clicks beats item popularity (CTR)."""
    ctr = pl.read_parquet(prepared / fmt.CTR)
    clicks = pl.col("label").cast(pl.Int32)
    popularity = ctr.filter(pl.col("split") == 0).group_by("item_idx").agg(clicks.sum().alias("pop"))
    scored = (
        ctr.with_columns(
            same=clicks.cum_sum().over(["user_idx", "category_idx"]) - clicks,
            before=clicks.cum_sum().over("user_idx") - clicks,
        )
        .join(popularity, on="item_idx", how="left")
        .fill_null(0)
    )
    held_out = scored.filter(pl.col("split") > 0)
    y = held_out["label"].to_numpy()
    affinity = ((held_out["same"] + 0.1) / (held_out["before"] + 1)).to_numpy()
    auc_affinity = roc_auc_score(y, affinity)
    auc_pop = roc_auc_score(y, held_out["pop"].to_numpy())
    assert auc_affinity > 0.62 and auc_affinity > auc_pop + 0.05, (auc_affinity, auc_pop)


def test_next_click_follows_recent_category(prepared):
    """Top items of the last clicked category beat globally top items at predicting the test click."""
    inter = pl.read_parquet(prepared / fmt.INTERACTIONS)
    clicked = inter.filter(pl.col("label") == 1)
    train = clicked.filter(pl.col("split") == 0)
    top = train.group_by("item_idx", "category_idx").len().sort(["len", "item_idx"], descending=True)
    global_top = set(top.head(10)["item_idx"])
    by_cat = (
        top.group_by("category_idx", maintain_order=True).head(10).group_by("category_idx").agg("item_idx")
    )
    last_cat = (
        clicked.filter(pl.col("split") < 2).group_by("user_idx").agg(pl.col("category_idx").last().alias("c"))
    )
    target = clicked.filter(pl.col("split") == 2).select("user_idx", "item_idx")
    rows = target.join(last_cat, on="user_idx").join(
        by_cat.rename({"category_idx": "c", "item_idx": "cand"}), on="c"
    )
    hr_cat = rows.select(pl.col("cand").list.contains(pl.col("item_idx")).mean()).item()
    hr_pop = target["item_idx"].is_in(list(global_top)).mean()
    assert hr_cat > 1.5 * hr_pop, (hr_cat, hr_pop)
