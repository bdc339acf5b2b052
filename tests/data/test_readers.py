from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.data import readers
from recsys_mamba.errors import RecsysError
from tests.data.conftest import ALL_COLUMNS, FIXTURES, make_spec

# (user, item) of the fixture events in file order
PAIRS = [
    (10, 100),
    (10, 101),
    (10, 102),
    (20, 100),
    (20, 103),
    (20, 101),
    (20, 100),
    (30, 104),
    (30, 100),
    (30, 101),
]
TIMES = [5, 3, 5, 1, 2, 9, 4, 7, 8, 6]


def _read(tmp_path: Path, **spec) -> pl.DataFrame:
    return readers.read(Path(spec["path"]), make_spec(**spec), tmp_path).collect()


def test_events_csv_all_columns(tmp_path):
    df = _read(tmp_path, path=str(FIXTURES / "events.csv"), columns=ALL_COLUMNS)
    assert df.columns == [*readers.STANDARD, "_row"]
    assert list(zip(df["user_id"], df["item_id"], strict=True)) == PAIRS
    assert df["timestamp"].to_list() == TIMES
    assert df["rating"].dtype == pl.Float32 and df["label"].dtype == pl.Int8
    assert df["_row"].to_list() == list(range(10))


def test_events_parquet_and_renamed_columns(tmp_path):
    src = pl.read_csv(FIXTURES / "events.csv").rename({"user_id": "uid", "timestamp": "ts"})
    path = tmp_path / "log.parquet"
    src.write_parquet(path)
    cols = {"user_id": "uid", "item_id": "item_id", "timestamp": "ts"}
    df = _read(tmp_path, path=str(path), columns=cols)
    assert df.columns == ["user_id", "item_id", "timestamp", "_row"]
    assert df["timestamp"].to_list() == TIMES


def test_parquet_slice_is_read_from_its_start(tmp_path):
    """A slice of a Parquet source keeps the file positions, read by the scan itself (not by
    numbering every row before the slice), and a file column called `_row` does not clash."""
    path = tmp_path / "log.parquet"
    pl.read_csv(FIXTURES / "events.csv").with_columns(pl.lit(-1).alias("_row")).write_parquet(path)
    lf = readers.read(path, make_spec(path=str(path)), tmp_path).slice(6, 3)
    assert lf.collect()["_row"].to_list() == [6, 7, 8]
    assert lf.collect()["item_id"].to_list() == [item for _, item in PAIRS[6:9]]
    assert "ROW INDEX" not in lf.explain()


def test_events_string_ids(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i9,3\nu2,i1,4\n")
    df = _read(tmp_path, path=str(path), id_type="str")
    assert df["user_id"].to_list() == ["u1", "u2"] and df["item_id"].dtype == pl.String


@pytest.mark.parametrize(
    ("name", "fmt", "sep"),
    [
        ("ratings.dat", "movielens", "::"),
        ("ratings.dat.gz", "movielens", "::"),
        ("u.data", "movielens", "\t"),
    ],
)
def test_movielens(tmp_path, name, fmt, sep):
    df = _read(tmp_path, path=str(FIXTURES / name), format=fmt, separator=sep)
    assert list(zip(df["user_id"], df["item_id"], strict=True)) == PAIRS
    assert df["timestamp"].to_list() == TIMES
    assert df["rating"].to_list()[:3] == [4.0, 2.0, 5.0]


def test_recbole_inter(tmp_path):
    df = _read(tmp_path, path=str(FIXTURES / "tiny.inter"), format="recbole", columns={"rating": "rating"})
    assert list(zip(df["user_id"], df["item_id"], strict=True)) == PAIRS
    assert df["timestamp"].dtype == pl.Int64 and df["timestamp"].to_list() == TIMES


def test_sequences_text(tmp_path):
    df = _read(tmp_path, path=str(FIXTURES / "sequences.txt"), format="sequences")
    assert df["user_id"].to_list() == [10, 10, 10, 20, 20, 20, 20, 30, 30, 30]
    assert df["item_id"].to_list() == [100, 101, 102, 100, 103, 101, 100, 104, 100, 101]
    assert df["timestamp"].to_list() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]


def test_sequence_pairs(tmp_path):
    df = _read(tmp_path, path=str(FIXTURES / "pairs.txt"), format="sequence_pairs")
    by_user = df.group_by("user_id", maintain_order=True).agg("item_id", "timestamp").sort("user_id")
    assert by_user["item_id"].to_list() == [[100, 101, 102], [100, 103, 101, 100], [104, 100, 101]]
    assert by_user["timestamp"].to_list() == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2]]


def test_taobao(tmp_path):
    df = _read(tmp_path, path=str(FIXTURES / "taobao.csv"), format="taobao")
    assert df["event_type"].cast(pl.String).to_list()[:3] == ["pv", "cart", "buy"]
    assert df["category"].to_list()[:2] == [97, 98]
    assert df["timestamp"].to_list() == TIMES


def test_reader_is_lazy(tmp_path):
    lf = readers.read(FIXTURES / "events.csv", make_spec(), tmp_path)
    assert isinstance(lf, pl.LazyFrame)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("sequences.txt", "movielens"),
        ("ratings.dat", "sequences"),
        ("events.csv", "taobao"),
        ("ratings.dat", "recbole"),
        ("u.data", "sequence_pairs"),
        ("sequences.txt", "events"),
    ],
)
def test_wrong_format_is_named(tmp_path, name, fmt):
    with pytest.raises(RecsysError, match="does not look like"):
        _read(tmp_path, path=str(FIXTURES / name), format=fmt)
