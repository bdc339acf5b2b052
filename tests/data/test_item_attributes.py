"""Optional per-item attributes (`data.item_attributes`): reading, indexing, manifest, cache, loader."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_mamba.config import compose
from recsys_mamba.data import format as fmt
from recsys_mamba.data import load_item_attributes, load_manifest, prepare
from recsys_mamba.data.spec import check_source, config_hash, normalize
from recsys_mamba.errors import RecsysError
from tests.data.conftest import FIXTURES, make_spec

# The fixture log has items 100..104 (item_idx 1..5); 100 and 101 have 2+ events, the rest one.
# "0101" and "101" are the same item with id_type=int; 555 is not in the events; one pair repeats.
JSON = {"100": ["red", 7, "red"], "0101": [7, "blue"], "103": [], "555": [1], "101": ["red"]}
ROWS = [
    ("100", "red"),
    ("100", "7"),
    ("100", "red"),
    ("0101", "7"),
    ("0101", "blue"),
    ("555", "1"),
    ("101", "red"),
]
# "red" and "7" are on 2 kept items each (the tie goes to the string order: "7" < "red"), "blue" on 1
ATTRIBUTE_MAP = [(1, "7"), (2, "red"), (3, "blue")]
LISTS = [[2, 1], [1, 3, 2], [], [], []]
INFO = {
    "items_with_attributes": 2,
    "items_without_attributes": 3,
    "unknown_items": 1,
    "duplicate_pairs": 1,
    "max_per_item": 3,
}


def _write(tmp_path: Path, suffix: str, rows=ROWS, name: str = "attrs") -> Path:
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(JSON if rows is ROWS else rows))
    elif suffix == ".parquet":
        ids = [int(i) for i, _ in rows]  # typed ids: 0101 is 101
        pl.DataFrame({"item_id": ids, "attribute": [a for _, a in rows]}).write_parquet(path)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text("item_id" + sep + "attribute\n" + "".join(f"{i}{sep}{a}\n" for i, a in rows))
    return path


def _prepare(tmp_path: Path, attrs: Path | str | None, **over) -> Path:
    spec = {"name": "t", "format": "events", "path": str(FIXTURES / "events.csv"), **over}
    if attrs is not None:
        spec["item_attributes"] = str(attrs)
    return prepare(spec, None, tmp_path / "cache")


def _tables(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(out / fmt.ATTRIBUTE_MAP), pl.read_parquet(out / fmt.ITEM_ATTRIBUTES)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".tsv", ".parquet"])
def test_every_format_gives_the_same_tables(tmp_path, suffix):
    out = _prepare(tmp_path, _write(tmp_path, suffix))
    amap, table = _tables(out)
    assert dict(amap.schema) == {"attribute_idx": pl.Int32(), "attribute": pl.String()}
    assert dict(table.schema) == {"item_idx": pl.Int32(), "attributes": pl.List(pl.Int32())}
    assert amap.rows() == ATTRIBUTE_MAP
    assert table["item_idx"].to_list() == [1, 2, 3, 4, 5]
    assert table["attributes"].to_list() == LISTS
    m = load_manifest(out)
    assert m["n_attributes"] == 3
    assert m["item_attributes"] == {"path": str(tmp_path / f"attrs{suffix}"), **INFO}
    assert {fmt.ATTRIBUTE_MAP, fmt.ITEM_ATTRIBUTES} <= set(m["files"])
    assert [s["path"] for s in m["sources"]][1:] == [str(tmp_path / f"attrs{suffix}")]


def test_integer_attributes_in_a_parquet_table(tmp_path):
    src = tmp_path / "a.parquet"
    pl.DataFrame({"item_id": [100, 101, 101], "attribute": [7, 7, 3]}).write_parquet(src)
    amap, table = _tables(_prepare(tmp_path, src))
    assert amap.rows() == [(1, "7"), (2, "3")]  # the same attribute as "7" in a JSON or CSV file
    assert table["attributes"].to_list() == [[1], [1, 2], [], [], []]


def test_no_attributes_file_writes_nothing(tmp_path):
    out = _prepare(tmp_path, None)
    m = load_manifest(out)
    assert m["n_attributes"] == 0 and m["item_attributes"] is None and len(m["sources"]) == 1
    assert not (out / fmt.ITEM_ATTRIBUTES).exists() and not (out / fmt.ATTRIBUTE_MAP).exists()
    assert load_item_attributes(out) is None


def test_items_dropped_by_filters_are_unknown(tmp_path):
    out = _prepare(tmp_path, _write(tmp_path, ".json"), filter={"min_item": 2})
    m = load_manifest(out)
    assert m["n_items"] == 2  # 100 and 101; 102..104 have one event each
    amap, table = _tables(out)
    assert amap.rows() == ATTRIBUTE_MAP and table["attributes"].to_list() == LISTS[:2]
    # 103 (dropped by the filter) and 555 (never in the events) are counted, not silently lost
    assert m["item_attributes"]["unknown_items"] == 2
    assert m["item_attributes"]["items_without_attributes"] == 0


def test_ids_match_as_the_events_ids_do(tmp_path):
    attrs = tmp_path / "a.json"
    attrs.write_text(json.dumps({"0100": ["x"], " 101 ": ["y"], "104": ["z"]}))
    table = _tables(_prepare(tmp_path, attrs))[1]
    assert table["attributes"].to_list() == [[1], [2], [], [], [3]]  # int ids: "0100" is item 100
    # with string ids "0100" is another item than "100"
    out = _prepare(tmp_path, attrs, id_type="str")
    assert _tables(out)[1]["attributes"].to_list() == [[], [], [], [], [1]]
    assert load_manifest(out)["item_attributes"]["unknown_items"] == 2


def test_a_json_key_given_twice_keeps_both_lists(tmp_path):
    attrs = tmp_path / "a.json"
    attrs.write_text('{"100": ["a", "b"], "100": ["b", "c"]}')
    out = _prepare(tmp_path, attrs)
    assert _tables(out)[1]["attributes"].to_list()[0] == [1, 2, 3]
    assert load_manifest(out)["item_attributes"]["duplicate_pairs"] == 1


def test_index_order_is_by_item_count_then_string(tmp_path):
    attrs = tmp_path / "a.json"
    # "b" on 3 items, "a" and "10" on 2 (string order: "10" < "a"), "z" and "2" on 1
    attrs.write_text(
        json.dumps({"100": ["z", "b", "a"], "101": ["a", "b", 10], "102": ["b", 10], "103": [2]})
    )
    amap, table = _tables(_prepare(tmp_path, attrs))
    assert amap.rows() == [(1, "b"), (2, "10"), (3, "a"), (4, "2"), (5, "z")]
    assert table["attributes"].to_list() == [[5, 1, 3], [3, 1, 2], [1, 2], [4], []]


def test_load_item_attributes_pads_with_zeros(tmp_path):
    out = _prepare(tmp_path, _write(tmp_path, ".json"))
    table = load_item_attributes(out)
    assert table.dtype == np.int64 and table.shape == (6, 3)  # n_items + 1 rows, K = max_per_item
    assert table.tolist() == [[0, 0, 0], [2, 1, 0], [1, 3, 2], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert load_item_attributes(str(out)).tolist() == table.tolist()


def test_load_item_attributes_refuses_a_folder_missing_the_file(tmp_path):
    out = _prepare(tmp_path, _write(tmp_path, ".json"))
    (out / fmt.ITEM_ATTRIBUTES).unlink()
    with pytest.raises(RecsysError, match=rf"{re.escape(str(out))}.*missing; run prepare again"):
        load_item_attributes(out)


def test_changed_attributes_file_rebuilds(tmp_path):
    attrs = _write(tmp_path, ".csv")
    out = _prepare(tmp_path, attrs)
    stamp = (out / fmt.MANIFEST).stat().st_mtime_ns
    assert _prepare(tmp_path, attrs) == out and (out / fmt.MANIFEST).stat().st_mtime_ns == stamp
    with attrs.open("a") as f:
        f.write("104,green\n")
    changed = _prepare(tmp_path, attrs)  # the hash takes the file's content: a new folder
    assert changed != out and (out / fmt.MANIFEST).stat().st_mtime_ns == stamp
    assert load_manifest(changed)["n_attributes"] == 4
    assert load_item_attributes(changed)[5].tolist() == [4, 0, 0]


def test_config_hash_without_attributes_is_unchanged(tmp_path):
    spec = make_spec()
    assert spec["item_attributes"] is None  # configs without the key still normalize
    # the hash of a config that does not set the key is the one it had before the key existed
    legacy = {k: v for k, v in spec.items() if k != "item_attributes"}
    legacy["path"] = {"sha256": hashlib.sha256(Path(spec["path"]).read_bytes()).hexdigest()}
    text = json.dumps({"format_version": fmt.FORMAT_VERSION, "data": legacy}, sort_keys=True, default=str)
    assert config_hash(spec) == hashlib.sha256(text.encode()).hexdigest()[:12]
    attrs = _write(tmp_path, ".json")
    assert config_hash(make_spec(item_attributes=str(attrs))) != config_hash(spec)


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (5, r"data.item_attributes=5 must be a path or null"),
        ("", r"data.item_attributes='' must be a path or null"),
        ("attrs.txt", r"data.item_attributes='attrs.txt': the file's suffix .* \['.json', '.csv'"),
    ],
)
def test_bad_config_value(value, match):
    with pytest.raises(RecsysError, match=match):
        make_spec(item_attributes=value)


def test_missing_file(tmp_path):
    missing = tmp_path / "none.json"
    spec = make_spec(item_attributes=str(missing))
    with pytest.raises(RecsysError, match=rf"data.item_attributes={re.escape(str(missing))}: no such file"):
        check_source(spec)  # what `prepare` and `train` check before any work
    with pytest.raises(RecsysError, match="no such file"):
        _prepare(tmp_path, missing)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", r"not valid JSON \(Expecting property name .* line 1, column 2\)"),
        ("[[100, 1]]", r"the JSON is a list, not one object"),
        ('{"100": 7}', r"item '100' maps to a number \(7\), not a list of attributes"),
        ('{"100": {"a": 1}}', r"item '100' maps to an object"),
        ('{"100": [1, [2]]}', r"item '100' has attribute \[2\] \(a list\)"),
        ('{"100": [null]}', r"item '100' has attribute null \(null\)"),
        ('{"100": [true]}', r"item '100' has attribute true \(a boolean\)"),
        ('{"100": [1.5]}', r"item '100' has attribute 1.5 \(a number\)"),
        ('{"100": [""]}', r"item '100' has attribute \"\" \(a string\)"),
        ('{"x7": [1]}', r"item ids must be integers .* \['x7'\]\. Ids that are not .*id_type=str"),
        ('{"": [1]}', r"1 item ids are empty"),
        ("{}", r"the file names no items"),
        ('{"9": [1], "10": [2]}', r"none of its 2 item ids is among the 5 kept items .* data.id_type"),
        ('{"100": [], "9": [1]}', r"none of the kept items has an attribute"),
    ],
)
def test_bad_json(tmp_path, text, match):
    attrs = tmp_path / "bad.json"
    attrs.write_text(text)
    with pytest.raises(RecsysError, match=rf"^{re.escape(str(attrs))}: {match}"):
        _prepare(tmp_path, attrs)


@pytest.mark.parametrize(
    ("suffix", "text", "match"),
    [
        (".csv", "", r"the file is empty"),
        (".csv", "item,attr\n100,1\n", r"missing columns \['item_id', 'attribute'\]; the file has \['item'"),
        (".csv", "item_id,attribute\n100,1\n101,\n", r"column 'attribute' is empty in 1 rows \(data row 2\)"),
        (".tsv", "item_id\tattribute\n\t1\n100\t2\n", r"column 'item_id' is empty in 1 rows \(data row 1\)"),
        (".csv", "item_id,attribute\n100,1\n1x,2\n", r"item ids must be integers .* \['1x'\] \(data row 2\)"),
        (".csv", "item_id,attribute\n100,1\n100,2,3\n", r"cannot be read as a CSV table"),
        (".parquet", "item_id,attribute\n", r"cannot be read as a Parquet table"),
    ],
)
def test_bad_table(tmp_path, suffix, text, match):
    attrs = tmp_path / f"bad{suffix}"
    attrs.write_text(text)
    with pytest.raises(RecsysError, match=rf"^{re.escape(str(attrs))}: {match}"):
        _prepare(tmp_path, attrs)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (pl.DataFrame({"item_id": [100, None], "attribute": ["a", "b"]}), r"'item_id' is empty .*\(row 2\)"),
        (pl.DataFrame({"item_id": [100, 101], "attribute": [None, "b"]}), r"'attribute' is empty.*\(row 1\)"),
        (pl.DataFrame({"item_id": [100], "attribute": [[1, 2]]}), r"column 'attribute' holds List\(Int64\)"),
        (pl.DataFrame({"item": [100], "attribute": ["a"]}), r"missing columns \['item_id'\]"),
        (pl.DataFrame({"item_id": [100.5], "attribute": ["a"]}), r"item ids must be integers .* \[100.5\]"),
    ],
)
def test_bad_parquet(tmp_path, frame, match):
    attrs = tmp_path / "bad.parquet"
    frame.write_parquet(attrs)
    with pytest.raises(RecsysError, match=rf"^{re.escape(str(attrs))}: .*{match}"):
        _prepare(tmp_path, attrs)


def test_bad_file_fails_before_the_events_are_read(tmp_path, monkeypatch):
    from recsys_mamba.data import readers

    def boom(*args, **kwargs):
        raise AssertionError("the events must not be read when the attributes file is bad")

    monkeypatch.setattr(readers, "read", boom)
    attrs = tmp_path / "bad.json"
    attrs.write_text('{"100": 7}')
    with pytest.raises(RecsysError, match="not a list of attributes"):
        _prepare(tmp_path, attrs)


# ---- real data ----------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_beauty_item_attributes(shared, tmp_path):
    cfg = compose("prepare", ["data=beauty", f"paths.shared_data_dir={shared}"])
    assert normalize(cfg.data)["item_attributes"].endswith("Beauty_item2attributes.json")
    out = prepare(cfg.data, None, tmp_path)
    m = load_manifest(out)
    assert m["n_items"] == 12_101 and m["n_attributes"] == 637
    assert {k: v for k, v in m["item_attributes"].items() if k != "path"} == {
        "items_with_attributes": 12_101,
        "items_without_attributes": 0,
        "unknown_items": 0,
        "duplicate_pairs": 5,  # the file repeats 5 (item, attribute) pairs
        "max_per_item": 6,
    }
    table = load_item_attributes(out)
    per_item = (table > 0).sum(axis=1)
    assert table.shape == (12_102, 6) and not table[0].any()
    assert per_item[1:].min() == 1 and per_item[1:].max() == 6
    assert table.max() == 637 and set(np.unique(table[table > 0])) == set(range(1, 638))
    # every item carries exactly the file's attributes (the file's ids are the events' ids)
    raw = json.loads(Path(m["item_attributes"]["path"]).read_text())
    items = pl.read_parquet(out / fmt.ITEM_MAP)["item_id"].to_list()
    names = dict(pl.read_parquet(out / fmt.ATTRIBUTE_MAP).iter_rows())
    for idx in (1, 2, 100, 6_000, 12_101):
        assert [names[a] for a in table[idx] if a] == list(dict.fromkeys(map(str, raw[items[idx - 1]])))
    # indices follow the number of items carrying the attribute
    carried = np.bincount(table[table > 0], minlength=638)[1:]
    assert (np.diff(carried) <= 0).all()
