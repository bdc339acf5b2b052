from __future__ import annotations

import polars as pl
import pytest

from recsys_mamba.data import steps
from recsys_mamba.errors import RecsysError


def _events(users, items, times=None, **extra) -> pl.LazyFrame:
    n = len(users)
    return pl.LazyFrame(
        {"user_id": users, "item_id": items, "timestamp": times or list(range(n)), **extra}
    ).with_row_index("_row")


def test_chrono_sort_is_stable_and_per_user():
    lf = _events([2, 1, 2, 1, 2], [10, 11, 12, 13, 14], [5, 9, 5, 1, 3])
    out = steps.chrono_sort(lf).collect()
    assert out["item_id"].to_list() == [13, 11, 14, 10, 12]  # ties (user 2, t=5) keep file order


def test_chrono_sort_fallback_for_string_ids_and_wide_spans():
    lf = _events(["b", "a", "b", "a", "b"], [10, 11, 12, 13, 14], [5, 9, 5, 1, 3])
    assert steps.chrono_sort(lf).collect()["item_id"].to_list() == [13, 11, 14, 10, 12]
    wide = _events([2, 1, 2], [10, 11, 12], [1 << 50, 0, -(1 << 50)])
    assert steps.chrono_sort(wide).collect()["item_id"].to_list() == [11, 12, 10]


def test_positional_timestamps():
    lf = _events([1, 2, 1, 1], [5, 6, 7, 8]).drop("timestamp")
    assert steps.positional_timestamps(lf).collect()["timestamp"].to_list() == [0, 0, 1, 2]


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("keep", [10, 10, 11, 10, 10]), ("exact", [10, 11, 10, 10]), ("first", [10, 11]), ("last", [11, 10])],
)
def test_deduplicate(policy, kept):
    lf = _events([1, 1, 1, 1, 1], [10, 10, 11, 10, 10], [1, 1, 2, 3, 4], event_type=["a", "a", "a", "a", "b"])
    assert steps.deduplicate(lf, policy).collect()["item_id"].to_list() == kept


def test_time_window_bounds():
    lf = _events([1] * 5, [1, 2, 3, 4, 5], [0, 10, 20, 30, 40])
    assert steps.time_window(lf, 10, 30).collect()["item_id"].to_list() == [2, 3]
    assert steps.time_window(lf, None, 10).collect()["item_id"].to_list() == [1]
    assert steps.time_window(lf, 30, None).collect()["item_id"].to_list() == [4, 5]


def test_kcore_iterates_until_stable():
    # items 30, 12 have 1 event; then user 3 has 1 event left; without user 3, item 20 has 1 event
    users = [1, 1, 2, 2, 3, 3, 1, 2]
    items = [10, 11, 10, 11, 20, 30, 20, 12]
    out, dropped = steps.kcore(_events(users, items), min_user=2, min_item=2, iterative=True)
    df = out.collect()
    assert sorted(set(df["item_id"])) == [10, 11]
    assert dropped == {"min_item": 3, "min_user": 1}
    for col, k in (("user_id", 2), ("item_id", 2)):
        assert df.group_by(col).len()["len"].min() >= k


def test_kcore_single_pass_differs():
    users = [1, 1, 2, 2, 3, 3, 1, 2]
    items = [10, 11, 10, 11, 20, 30, 20, 12]
    out, dropped = steps.kcore(_events(users, items), min_user=2, min_item=2, iterative=False)
    assert dropped == {"min_item": 2, "min_user": 1}
    assert out.collect().height == 5


def test_kcore_off_is_identity():
    lf = _events([1], [2])
    out, dropped = steps.kcore(lf, 0, 0, True)
    assert out is lf and dropped == {"min_item": 0, "min_user": 0}


def test_index_map_reserves_zero_and_sorts():
    m = steps.index_map(pl.Series([30, 10, 20, 10, None]), "idx", "id")
    assert m["idx"].to_list() == [1, 2, 3] and m["id"].to_list() == [10, 20, 30]
    assert m["idx"].dtype == pl.Int32


def test_user_index_matches_map_on_sorted_frame():
    lf = steps.chrono_sort(_events([30, 10, 20, 10], [1, 2, 3, 4]))
    df = steps.user_index(lf).collect()
    umap = steps.index_map(df["user_id"], "user_idx", "user_id")
    joined = df.join(umap, on="user_id", suffix="_map")
    assert (joined["user_idx"] == joined["user_idx_map"]).all()


def test_encode_unknown_is_zero():
    mapping = pl.DataFrame({"idx": pl.Series([1, 2], dtype=pl.Int32), "cat": ["x", "y"]})
    out = steps.encode(pl.LazyFrame({"cat": ["y", None, "x"]}), "cat", mapping, "idx").collect()
    assert out["idx"].to_list() == [2, 0, 1]


def test_event_type_names():
    present = pl.Series(["pv", "buy", None, "pv"])
    assert steps.event_type_names(present, None) == ["buy", "pv"]
    assert steps.event_type_names(present, ["pv", "cart", "buy"]) == ["pv", "cart", "buy"]
    with pytest.raises(RecsysError, match=r"not in data\.event_types"):
        steps.event_type_names(present, ["pv"])


@pytest.mark.parametrize(
    ("ctr", "labels"),
    [
        ({"label_from": "rating", "rating_threshold": 4.0}, [0, 1, 1]),
        ({"label_from": "event_type", "positive_events": ["buy", "cart"]}, [0, 1, 1]),
        ({"label_from": "label"}, [0, 1, 1]),
        (None, [None, None, None]),
    ],
)
def test_click_labels(ctr, labels):
    lf = pl.LazyFrame({"rating": [3.5, 4.0, 5.0], "event_type": ["pv", "buy", "cart"], "label": [0, 2, 1]})
    assert steps.click_labels(lf, ctr).collect()["label"].to_list() == labels


def test_build_sequences_keeps_order():
    df = pl.DataFrame(
        {"user_idx": [1, 1, 2, 4, 4, 4], "item_idx": [5, 3, 4, 7, 8, 9], "timestamp": [1, 2, 1, 0, 0, 3]}
    )
    out = steps.build_sequences(df, {"items": "item_idx", "timestamps": "timestamp"})
    assert out["user_idx"].to_list() == [1, 2, 4]
    assert out["items"].to_list() == [[5, 3], [4], [7, 8, 9]]
    assert out["timestamps"].to_list() == [[1, 2], [1], [0, 0, 3]]
    assert out.schema["items"] == pl.List(pl.Int64)


def test_chrono_sort_packed_key_paths_agree():
    # wide user range: (user, time, row) does not fit 64 bits, (user, time) does; both keep file order on ties
    users = [5, 1 << 60, 5, 1 << 60, 5]
    lf = _events(users, [10, 11, 12, 13, 14], [3, 1, 3, 1, 2])
    expected = [14, 10, 12, 11, 13]
    assert steps.chrono_sort(lf).collect()["item_id"].to_list() == expected
    small = _events([0, 1, 0, 1, 0], [10, 11, 12, 13, 14], [3, 1, 3, 1, 2])
    assert steps.chrono_sort(small).collect()["item_id"].to_list() == expected


def test_chrono_sort_of_a_bucket_whose_rows_are_far_into_the_file():
    # a bucket of a bigger log: 4 rows whose `_row`s (file positions) need more bits than the row count;
    # they must not spill into the timestamp and put a later event first
    lf = pl.LazyFrame(
        {"user_id": [7, 7, 7, 7], "item_id": [10, 11, 12, 13], "timestamp": [2, 1, 1, 0]}
    ).with_columns(pl.Series("_row", [1000, 5, 999, 1003], dtype=pl.UInt32))
    assert steps.chrono_sort(lf).collect()["item_id"].to_list() == [13, 11, 12, 10]


@pytest.mark.parametrize("shift", [0, 1 << 20])
def test_chrono_sort_of_rows_in_file_order_matches_the_three_column_sort(shift):
    # rows in file order (as in a bucket), so the position in the frame breaks ties; `_row`s far
    # into the file change nothing
    users = [(7 * i) % 5 for i in range(40)]
    times = [(3 * i) % 4 for i in range(40)]
    lf = pl.LazyFrame({"user_id": users, "item_id": list(range(40)), "timestamp": times}).with_columns(
        (pl.int_range(pl.len(), dtype=pl.UInt32) * 3 + shift).alias("_row")
    )
    expected = lf.sort(steps.CHRONO).collect()
    assert steps.chrono_sort(lf).collect().equals(expected)
