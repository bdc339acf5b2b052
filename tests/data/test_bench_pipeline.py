from __future__ import annotations

import polars as pl

from recsys_mamba.bench import pipeline as bench_pipeline
from recsys_mamba.config import compose


def test_generated_log(tmp_path):
    path = tmp_path / "log.parquet"
    bench_pipeline.generate_log(path, events=5000, users=100, items=50, seed=0, chunk=2000)
    log = pl.read_parquet(path)
    assert log.height == 5000 and log["timestamp"].is_sorted()
    assert log["user_id"].n_unique() <= 100 and log["item_id"].max() <= 50


def test_miniature_benchmark(tmp_path):
    cfg = compose(
        "bench_pipeline",
        [
            "ml1m=false",
            "big.n_events=3000",
            "big.n_users=100",
            "big.n_items=60",
            "big.chunk=1000",
            f"work_dir={tmp_path / 'work'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
    )
    result = bench_pipeline.bench(cfg)
    (case,) = result["cases"]
    assert case["events_in"] == 3000 and case["events_per_s"] > 0 and case["peak_rss_mib"] > 10
    assert not (tmp_path / "work").exists()
