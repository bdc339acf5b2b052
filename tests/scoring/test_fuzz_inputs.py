"""Property-based fuzzing of the scoring job's input readers (hypothesis), without a trained model.

Random event logs (Parquet, CSV, a folder of Parquet parts; int, unicode and beyond-int64 ids;
unknown users and items; equal timestamps) must be read back exactly and turned into histories where
every event is either in its user's history, in time order, or counted as unknown. Corrupted inputs
and bad shard strings must give a `RecsysError` naming the input (or the shard), never another
exception. `RECSYS_FUZZ_EXAMPLES=N` runs N examples per test.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys_mamba.errors import RecsysError
from recsys_mamba.scoring import inputs
from recsys_mamba.sequences.prepared import ItemTable
from tests.helpers import fuzz_settings

I64 = (-(2**63), 2**63 - 1)
EVENT_TYPES = ["pv", "buy", "é"]


def fake_model(items: list[str], categories: list[int]) -> SimpleNamespace:
    """The parts of a prepared folder the input functions use: the item table and the event types."""
    table = ItemTable(
        ids=np.array(["", *items], dtype=object),
        categories=np.array([0, *categories], dtype=np.int64),
        counts=np.zeros(len(items) + 1),
    )
    return SimpleNamespace(items=table, event_type_names=EVENT_TYPES)


IDS = st.one_of(
    st.integers(0, 30).map(str),
    st.integers(*I64).map(str),
    st.integers(2**63, 2**70).map(str),
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), min_size=1, max_size=5
    ),
    st.sampled_from(
        ["007", "7", "NA", "null", "ü", "😀", "a,b", 'q"'],
    ),
)


@st.composite
def event_logs(draw: st.DrawFn) -> dict[str, Any]:
    known = draw(st.lists(IDS, min_size=1, max_size=6, unique=True))
    unknown = draw(st.lists(IDS.filter(lambda s: s not in known), max_size=3, unique=True))
    users = draw(st.lists(IDS, min_size=1, max_size=5, unique=True))
    n = draw(st.integers(0, 25))
    rows = {
        "user_id": draw(st.lists(st.sampled_from(users), min_size=n, max_size=n)),
        "item_id": draw(st.lists(st.sampled_from(known + unknown), min_size=n, max_size=n)),
    }
    if draw(st.booleans()):
        rows["timestamp"] = draw(
            st.lists(st.one_of(st.integers(0, 3), st.integers(*I64)), min_size=n, max_size=n)
        )
    if draw(st.booleans()):
        types = st.one_of(st.none(), st.sampled_from([*EVENT_TYPES, "other"]))
        rows["event_type"] = draw(st.lists(types, min_size=n, max_size=n))
    int_ids = draw(st.booleans()) and all(_is_int(v) for v in rows["user_id"] + rows["item_id"])
    return {
        "rows": rows,
        "known": known,
        "categories": draw(st.lists(st.integers(0, 5), min_size=len(known), max_size=len(known))),
        "int_ids": int_ids,
        "layout": draw(st.sampled_from(["parquet", "csv", "parts"])),
        "shards": draw(st.integers(1, 5)),
    }


def _is_int(value: str) -> bool:
    try:
        return I64[0] <= int(value) <= I64[1] and str(int(value)) == value
    except ValueError:
        return False


def frame(case: dict[str, Any]) -> pl.DataFrame:
    rows = case["rows"]
    ids = pl.Int64 if case["int_ids"] else pl.String
    cols = {
        "user_id": pl.Series(rows["user_id"], dtype=pl.String).cast(ids),
        "item_id": pl.Series(rows["item_id"], dtype=pl.String).cast(ids),
    }
    if "timestamp" in rows:
        cols["timestamp"] = pl.Series(rows["timestamp"], dtype=pl.Int64)
    if "event_type" in rows:
        cols["event_type"] = pl.Series(rows["event_type"], dtype=pl.String)
    return pl.DataFrame(cols)


def write(df: pl.DataFrame, layout: str, folder: Path) -> Path:
    if layout == "csv":
        path = folder / "events.csv"
        df.write_csv(path)
    elif layout == "parquet":
        path = folder / "events.parquet"
        df.write_parquet(path)
    else:
        path = folder / "parts"
        path.mkdir()
        half = df.height // 2
        df.slice(0, half).write_parquet(path / "a.parquet")
        df.slice(half).write_parquet(path / "b.parquet")
    return path


@fuzz_settings(default=120)
@given(case=event_logs())
def test_events_become_histories_with_every_event_accounted_for(case: dict[str, Any], reliability) -> None:
    reliability.fuzz("scoring/input")
    rows, known = case["rows"], case["known"]
    n = len(rows["user_id"])
    model = fake_model(known, case["categories"])
    with tempfile.TemporaryDirectory() as tmp:
        src = write(frame(case), case["layout"], Path(tmp))
        events = inputs.read_events(src)
    # read back exactly: ids as the strings written, times as written (file order when absent)
    assert events["user_id"].to_list() == rows["user_id"]
    assert events["item_id"].to_list() == rows["item_id"]
    assert events["timestamp"].to_list() == rows.get("timestamp", list(range(n)))
    users, unknown = inputs.histories(model, events)
    assert unknown == sum(item not in model.items.index for item in rows["item_id"])
    assert users["user_id"].to_list() == sorted(set(rows["user_id"]))
    # each user's history: its known items in time order, equal times in file order
    expected: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    times = rows.get("timestamp", list(range(n)))
    types = rows.get("event_type", [None] * n)
    for pos, (user, item, t, et) in enumerate(
        zip(rows["user_id"], rows["item_id"], times, types, strict=True)
    ):
        if item in model.items.index:
            idx = model.items.index[item]
            type_idx = EVENT_TYPES.index(et) + 1 if et in EVENT_TYPES else 0
            expected[user].append((t, pos, idx, type_idx))
    for user, items, cats, etypes in users.select(
        "user_id", "items", "categories", "event_types"
    ).iter_rows():
        want = sorted(expected.get(user, []))
        assert items == [w[2] for w in want]
        assert cats == [int(model.items.categories[w[2]]) for w in want]
        assert etypes == [w[3] for w in want]
    assert sum(len(x) for x in users["items"].to_list()) + unknown == n
    # shards partition the users
    count = case["shards"]
    masks = [inputs.shard_mask(users["user_id"], f"{i}/{count}") for i in range(count)]
    assert (np.sum(masks, axis=0) == 1).all()


BAD_VALUES = st.sampled_from(
    [
        pl.Series([1.5, 2.0]),
        pl.Series([float("nan"), 2.0]),
        pl.Series([float("inf"), 1.0]),
        pl.Series([2.0**70, 1.0]),
        pl.Series(["x", "1"]),
        pl.Series(["1.5", "2"]),
        pl.Series(["", "2"]),
        pl.Series([None, 1], dtype=pl.Int64),
        pl.Series([None, "a"], dtype=pl.String),
        pl.Series([[1], [2]]),
        pl.Series([{"a": 1}, {"a": 2}]),
        pl.Series([b"\xff", b"a"]),
        pl.Series([True, False]),
        pl.Series([2**64 - 1, 1], dtype=pl.UInt64),
        pl.Series([1, 2]).cast(pl.Datetime("ms")),
        pl.Series([1, 2]).cast(pl.Decimal(10, 2)),
        pl.Series([-(2**63), 2**63 - 1]),
    ]
)


@st.composite
def corrupted_inputs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(
            [
                "bad_column",
                "missing_column",
                "text",
                "bytes",
                "truncate",
                "empty",
                "no_parts",
                "clashing_parts",
                "missing_path",
                "header_only",
            ]
        )
    )
    return {
        "kind": kind,
        "column": draw(st.sampled_from(["user_id", "item_id", "timestamp", "event_type"])),
        "values": draw(BAD_VALUES),
        "text": draw(st.text(max_size=60)),
        "bytes": draw(st.binary(max_size=60)),
        "at": draw(st.floats(0, 1)),
        "csv": draw(st.booleans()),
    }


def _save(df: pl.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        df.write_csv(path)
    else:
        df.write_parquet(path)


def make_corrupt(case: dict[str, Any], folder: Path) -> Path:
    base = pl.DataFrame(
        {"user_id": ["u1", "u2"], "item_id": ["a", "b"], "timestamp": [1, 2], "event_type": ["pv", "x"]}
    )
    kind = case["kind"]
    path = folder / ("in.csv" if case["csv"] else "in.parquet")
    if kind == "bad_column":
        df = base.with_columns(case["values"].alias(case["column"]))
        if case["csv"]:
            try:
                df.write_csv(path)
            except Exception:  # a nested column has no CSV form: write it as Parquet instead
                path = folder / "in.parquet"
                df.write_parquet(path)
        else:
            df.write_parquet(path)
    elif kind == "missing_column":
        _save(base.drop(case["column"]), path)
    elif kind == "text":
        path.write_text(case["text"])
    elif kind == "bytes":
        path.write_bytes(case["bytes"])
    elif kind == "truncate":
        _save(base, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * case["at"])])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "header_only":
        path = folder / "in.csv"
        path.write_text("user_id,item_id\n")
    elif kind == "no_parts":
        path = folder / "parts"
        path.mkdir()
        (path / "notes.txt").write_text("x")
    elif kind == "clashing_parts":
        path = folder / "parts"
        path.mkdir()
        base.write_parquet(path / "a.parquet")
        base.with_columns(case["values"].alias(case["column"])).write_parquet(path / "b.parquet")
    else:
        path = folder / "nowhere" / "in.parquet"
    return path


def _accounted(events: pl.DataFrame, path: Path) -> None:
    """A corrupted input that still reads must hold only complete rows."""
    for col in ("user_id", "item_id", "timestamp"):
        assert events[col].null_count() == 0, (path, events)


@fuzz_settings(default=200)
@given(case=corrupted_inputs())
def test_corrupted_inputs_fail_clearly(case: dict[str, Any], reliability) -> None:
    reliability.fuzz("scoring/input")
    model = fake_model(["a", "b", "c"], [1, 2, 1])
    with tempfile.TemporaryDirectory() as tmp:
        path = make_corrupt(case, Path(tmp))
        try:
            events = inputs.read_events(path)
            _accounted(events, path)
            users, unknown = inputs.histories(model, events)
            assert sum(len(x) for x in users["items"].to_list()) + unknown == events.height
            inputs.shard_mask(users["user_id"], "0/2")
        except RecsysError as err:
            assert f"input={path}" in str(err), str(err)
            assert "\n" not in str(err)
        try:
            pairs = inputs.read_table(path, inputs.EVENT_COLUMNS)
            _ = [inputs.as_ids(pairs, c, path) for c in inputs.EVENT_COLUMNS]
        except RecsysError as err:
            assert f"input={path}" in str(err), str(err)


SHARDS = st.one_of(
    st.text(max_size=12),
    st.builds(lambda i, n: f"{i}/{n}", st.integers(-5, 2**70), st.integers(-5, 2**70)),
    st.builds(lambda i, n: f"{i}/{n}", st.integers(0, 9), st.integers(0, 9)),
    st.integers(-5, 5),
    st.none(),
    st.floats(allow_nan=True),
    st.sampled_from(["0/1", " 1 / 2 ", "٣/٤", "1e3/2e3", "0/1/2", "1/0", "0x1/0x2", "+1/2", "1_0/20"]),
)


@fuzz_settings(default=300)
@given(shard=SHARDS, users=st.lists(IDS, max_size=10))
def test_shard_strings_are_parsed_or_refused(shard: Any, users: list[str], reliability) -> None:
    reliability.fuzz("scoring/shard")
    try:
        index, count = inputs.parse_shard(shard)
    except RecsysError as err:
        assert "shard=" in str(err)
        with pytest.raises(RecsysError, match="shard="):
            inputs.shard_mask(pl.Series(users, dtype=pl.String), shard)
        return
    assert isinstance(shard, str) and 0 <= index < count <= inputs.MAX_SHARDS
    assert shard.strip().split("/")[0].strip().isascii()
    mask = inputs.shard_mask(pl.Series(users, dtype=pl.String), shard)
    assert mask.dtype == bool and len(mask) == len(users)
