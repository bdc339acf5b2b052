"""Scores give ids back in the input's type: integer ids stay integers, text stays text."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.scoring import inputs
from tests.scoring.test_scoring import job, read


def _as(events: Path, out: Path, dtype: pl.DataType) -> Path:
    """The trained model's event log (text ids of integers) with both id columns as `dtype`."""
    frame = pl.read_parquet(events).with_columns(pl.col("user_id", "item_id").cast(dtype))
    frame.write_parquet(out)
    return out


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("user_id", "item_id").cast(pl.String)).sort(["user_id", "rank"])


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Int32, pl.UInt64])
def test_topk_keeps_integer_ids(trained, tmp_path: Path, dtype) -> None:
    text = read(job(trained, tmp_path / "text", "top_k=3").parent)
    assert text.schema["user_id"] == pl.String and text.schema["item_id"] == pl.String  # text in, text out

    events = _as(trained["events"], tmp_path / "ints.parquet", dtype)
    ints = read(job(trained, tmp_path / "ints", f"input={events}", "top_k=3").parent)
    assert ints.schema["user_id"] == dtype and ints.schema["item_id"] == dtype
    assert _sorted(ints).equals(_sorted(text)), "the same rows, only typed"


def test_candidates_keep_the_pairs_types(trained, tmp_path: Path) -> None:
    known = pl.read_parquet(trained["events"]).head(2)
    users, items = known["user_id"].cast(pl.Int64), known["item_id"].cast(pl.Int64)
    pl.DataFrame({"user_id": users, "item_id": items}).write_parquet(tmp_path / "ints.parquet")
    # Whole floats (what a pandas frame with a missing value makes of ints) are the same ids.
    floats = pl.DataFrame({"user_id": users.cast(pl.Float64), "item_id": items.cast(pl.Float64)})
    floats.write_parquet(tmp_path / "floats.parquet")
    for name in ("ints", "floats"):
        job(trained, tmp_path / name, "mode=candidates", f"input={tmp_path / f'{name}.parquet'}")
        out = pl.read_parquet(next((tmp_path / name).glob("*.parquet")))
        assert out.schema["user_id"] == pl.Int64 and out.schema["item_id"] == pl.Int64, name
        assert out["known_item"].all() and out["score"].null_count() == 0, name
        assert sorted(out["item_id"]) == sorted(items)


def test_csv_ids_are_integers_only_when_written_as_integers(trained, tmp_path: Path) -> None:
    events = pl.read_parquet(trained["events"]).select("user_id", "item_id", "timestamp")
    events.write_csv(tmp_path / "events.csv")
    out = read(job(trained, tmp_path / "o", f"input={tmp_path / 'events.csv'}", "top_k=2").parent)
    assert out.schema["user_id"] == pl.Int64 and out.schema["item_id"] == pl.Int64

    padded = events.with_columns(pl.col("user_id").str.zfill(12))  # "000000000007" is not the integer 7
    padded.write_csv(tmp_path / "padded.csv")
    out = read(job(trained, tmp_path / "p", f"input={tmp_path / 'padded.csv'}", "top_k=2").parent)
    assert out.schema["user_id"] == pl.String and out["user_id"][0].startswith("0")
    assert out.schema["item_id"] == pl.Int64


def test_stream_keeps_integer_ids(trained, tmp_path: Path) -> None:
    events = _as(trained["events"], tmp_path / "ints.parquet", pl.Int64)
    out = read(job(trained, tmp_path / "s", "mode=stream", f"input={events}", "top_k=2").parent)
    assert out.schema["user_id"] == pl.Int64 and out.schema["item_id"] == pl.Int64


def test_id_type_rules() -> None:
    assert inputs.id_type(pl.Series([1, 2], dtype=pl.Int16)) == pl.Int16
    assert inputs.id_type(pl.Series([1.0, 2.0])) == pl.Int64
    assert inputs.id_type(pl.Series(["1", "2"])) == pl.String  # a typed file's text stays text
    assert inputs.id_type(pl.Series(["1", "-2", "0"]), text_file=True) == pl.Int64
    for odd in (["007"], ["+7"], [" 7"], ["9" * 20], ["a"]):
        assert inputs.id_type(pl.Series(odd), text_file=True) == pl.String, odd
    # The model's items as the input's type only when every one converts exactly.
    assert inputs.output_type(["1", "22"], pl.Int64) == pl.Int64
    assert inputs.output_type(["1", "x"], pl.Int64) == pl.String
    assert inputs.output_type(["-1"], pl.UInt32) == pl.String
