from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.data import validate
from recsys_mamba.errors import RecsysError
from tests.data.conftest import make_spec

SRC = Path("log.csv")


def test_required_columns_follow_the_config():
    assert validate.required_columns(make_spec(), has_timestamp=True) == ["user_id", "item_id", "timestamp"]
    spec = make_spec(ctr={"label_from": "event_type", "positive_events": ["buy"]})
    assert validate.required_columns(spec, has_timestamp=False) == ["user_id", "item_id", "event_type"]


def test_handle_nulls_drop_and_error():
    df = pl.DataFrame({"user_id": [1, None, 3, None], "item_id": [1, 2, 3, 4]}).with_row_index("_row")
    counts = validate.null_counts(df, ["user_id", "item_id"])
    assert counts == {"user_id": 2}
    kept = validate.handle_nulls(df.lazy(), ["user_id"], counts, "drop", SRC).collect()
    assert kept["user_id"].to_list() == [1, 3]
    with pytest.raises(
        RecsysError, match=r"log.csv: column 'user_id' is empty in 2 rows \(data rows \[2, 4\]"
    ):
        validate.handle_nulls(df.lazy(), ["user_id"], counts, "error", SRC)
    assert validate.handle_nulls(df.lazy(), ["item_id"], {}, "error", SRC) is not None


def test_diagnose_names_column_and_lines():
    strings = pl.LazyFrame(
        {
            "user_id": ["1", "2", "3"],
            "item_id": ["4", "5", "6"],
            "timestamp": ["1", "2.5", "x"],
            "_line": [2, 3, 4],
        }
    )
    err = validate.diagnose(strings, make_spec(), SRC, RuntimeError("boom"))
    assert "column 'timestamp' must hold numbers but has line 4: 'x'" in str(err)
    clean = strings.with_columns(pl.lit("7").alias("timestamp"))
    assert "cannot be read as data.format='events': boom" in str(
        validate.diagnose(clean, make_spec(), SRC, RuntimeError("boom"))
    )


def test_check_not_empty():
    validate.check_not_empty(1, SRC, "x")
    with pytest.raises(RecsysError, match="no events left after step"):
        validate.check_not_empty(0, SRC, "step 'filter'")
