"""The partition pass: every row in exactly one bucket, in file order, users split by range."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.data import buckets
from recsys_mamba.data.spec import normalize


def test_partition_in_slices_keeps_every_row_once_in_file_order(tmp_path: Path, monkeypatch) -> None:
    users = [(7 * i) % 13 for i in range(30)]
    log = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": users, "item_id": list(range(30)), "timestamp": [0] * 30}).with_columns(
        pl.when(pl.int_range(30) == 11).then(None).otherwise(pl.col("user_id")).alias("user_id")
    ).write_parquet(log)
    monkeypatch.setattr(buckets, "SLICE_ROWS", 4)
    source = buckets.Source(log, normalize({"name": "t", "path": str(log)}), tmp_path)
    assert len(buckets.slices(source, 30)) == 8
    bounds = buckets.boundaries(source, 3, 30)
    part = buckets.partition(source, bounds, tmp_path, 30)
    assert part.rows == 30 and part.null_users == 1 and part.null_user_rows == [11]
    seen = []
    for b, rows in sorted(part.bucket_rows.items()):
        files = buckets.raw_parts(tmp_path, b)
        assert len(files) > 1  # one per slice that held the bucket's users
        df = pl.concat([pl.read_ipc(f) for f in files])
        assert df.height == rows and df["_row"].is_sorted()
        if b:
            assert df["user_id"].min() >= bounds[b - 1]
        if b < bounds.len():
            assert df["user_id"].max() < bounds[b]
        seen += df["_row"].to_list()
    assert sorted(seen) == [r for r in range(30) if r != 11]


@pytest.mark.parametrize(
    "bounds",
    [
        pl.Series([-3, 4, 4, 9]),  # integer ids: the lookup table over [-3, 9]
        pl.Series([5]),  # a single boundary: a table of one entry
        pl.Series([0, 1 << 40]),  # a range too wide for a table: the binary search
        pl.Series(["b", "d"]),  # string ids: the binary search
    ],
)
def test_bucket_key_counts_the_boundaries_at_or_below_each_id(bounds: pl.Series) -> None:
    if bounds.dtype == pl.String:
        ids = pl.Series("user_id", ["a", "b", "c", "d", "e", None])
    else:
        ids = pl.Series("user_id", [-10, -3, -2, 3, 4, 5, 8, 9, 10, 1 << 41, None], dtype=pl.Int64)
    got = pl.DataFrame(ids).select(buckets.bucket_key(bounds)).to_series().to_list()
    expected = [None if x is None else sum(b <= x for b in bounds.to_list()) for x in ids.to_list()]
    assert got == expected
