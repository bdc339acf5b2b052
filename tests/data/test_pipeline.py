from __future__ import annotations

import json
import subprocess
import sys
import threading

import polars as pl
import pytest

from recsys_mamba.data import format as fmt
from recsys_mamba.data import load_manifest, pipeline, prepare, readers
from recsys_mamba.data.spec import config_hash
from tests.data.conftest import ALL_COLUMNS, FIXTURES, make_spec

CTR = {"label_from": "rating", "rating_threshold": 4.0}


def _prepare(tmp_path, **over):
    spec = {"name": "t", "format": "events", "path": str(FIXTURES / "events.csv"), **over}
    return prepare(spec, None, tmp_path / "cache")


def test_output_contract(tmp_path):
    out = _prepare(tmp_path, columns=ALL_COLUMNS, ctr=CTR)
    m = load_manifest(out)
    assert out.name == f"t-{m['config_hash']}" and out.parent == tmp_path / "cache"
    assert (m["n_users"], m["n_items"], m["n_interactions"]) == (3, 5, 10)
    assert m["event_types"] == ["buy", "cart", "fav", "pv"] and m["n_categories"] == 3
    assert m["sources"][0]["sha256"] and m["sources"][0]["bytes"] == (FIXTURES / "events.csv").stat().st_size
    inter = pl.read_parquet(out / fmt.INTERACTIONS)
    assert dict(inter.schema) == fmt.INTERACTIONS_SCHEMA
    # user 10's events: t=3 (101), t=5 (100, then 102: the tie keeps file order)
    first = inter.filter(pl.col("user_idx") == 1)
    items = pl.read_parquet(out / fmt.ITEM_MAP)
    ids = dict(zip(items["item_idx"], items["item_id"], strict=True))
    assert [ids[i] for i in first["item_idx"]] == ["101", "100", "102"]
    assert first["split"].to_list() == [0, 1, 2]
    assert inter["label"].to_list()[:3] == [0, 1, 1]
    seqs = pl.read_parquet(out / fmt.SEQUENCES)
    assert seqs.columns == ["user_idx", *fmt.SEQUENCE_COLUMNS]
    assert seqs.schema["items"] == pl.List(pl.Int32) and seqs.schema["labels"] == pl.List(pl.Int8)
    assert seqs["user_idx"].to_list() == [1, 2, 3]
    lengths = seqs.select(pl.col(c).list.len() for c in fmt.SEQUENCE_COLUMNS)
    assert all(lengths[c].to_list() == [3, 4, 3] for c in lengths.columns)
    users = pl.read_parquet(out / fmt.USER_MAP)
    assert users["user_id"].to_list() == ["10", "20", "30"]
    assert items["count"].sum() == (inter["split"] == 0).sum()
    cats = pl.read_parquet(out / fmt.CATEGORY_MAP)
    assert cats["category"].to_list() == ["a", "b", "c"]
    ctr = pl.read_parquet(out / fmt.CTR)
    assert ctr.height == 10 and m["ctr"]["n_positives"] == 6
    # the CTR history of a sample is items[:hist_len] of its user's sequence
    row = ctr.filter((pl.col("user_idx") == 2) & (pl.col("hist_len") == 2)).row(0, named=True)
    assert seqs["items"][1][2] == row["item_idx"]
    assert set(m) >= {
        "format_version",
        "name",
        "config",
        "config_hash",
        "sources",
        "n_users",
        "n_items",
        "n_interactions",
        "n_categories",
        "n_event_types",
        "event_types",
        "dropped",
        "steps",
        "split",
        "ctr",
        "files",
        "package_version",
        "created_at",
    }


def test_manifest_counts_every_dropped_row(tmp_path):
    out = _prepare(tmp_path, duplicates="first", time_window={"start": 2, "end": 9}, filter={"min_item": 2})
    m = load_manifest(out)
    assert m["steps"][0]["rows_in"] == 10
    assert m["n_interactions"] + sum(m["dropped"].values()) == 10
    assert set(m["dropped"]) <= {"duplicate", "out_of_time_window", "min_item", "min_user"}
    for a, b in zip(m["steps"], m["steps"][1:], strict=False):
        assert a["rows_out"] == b["rows_in"]


def test_positional_timestamps_when_log_has_none(tmp_path):
    out = _prepare(tmp_path, columns={"timestamp": None})
    m = load_manifest(out)
    inter = pl.read_parquet(out / fmt.INTERACTIONS)
    assert not m["has_timestamps"]
    assert inter.filter(pl.col("user_idx") == 2)["timestamp"].to_list() == [0, 1, 2, 3]


def test_temporal_split_and_sampled_negatives(tmp_path):
    out = _prepare(
        tmp_path,
        split={"kind": "temporal", "test_time": 7, "valid_time": 5},
        ctr={"label_from": "none", "negatives": 2, "seed": 1},
    )
    inter = pl.read_parquet(out / fmt.INTERACTIONS)
    expected = [2 if t >= 7 else 1 if t >= 5 else 0 for t in inter["timestamp"]]
    assert inter["split"].to_list() == expected
    ctr = pl.read_parquet(out / fmt.CTR)
    assert ctr.height == 30 and ctr["sampled_negative"].sum() == 20


def test_cache_is_reused_without_reading(tmp_path, monkeypatch):
    out = _prepare(tmp_path)
    stamp = (out / fmt.MANIFEST).stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the cache hit must not read the data")

    monkeypatch.setattr(readers, "read", boom)
    assert _prepare(tmp_path) == out
    assert (out / fmt.MANIFEST).stat().st_mtime_ns == stamp


def test_two_prepares_of_one_config_at_once_prepare_it_once(tmp_path, monkeypatch):
    """The second waits for the first and reuses its folder: replacing it would pull the folder (and the
    sequence store being built in it) from under the process that made it."""
    runs, started, release = [], threading.Event(), threading.Event()
    run = pipeline._run

    def held(*args, **kwargs):
        runs.append(threading.current_thread().name)
        started.set()
        release.wait(30)
        return run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run", held)
    found: dict[str, object] = {}
    first = threading.Thread(target=lambda: found.update(first=_prepare(tmp_path)), name="first")
    second = threading.Thread(target=lambda: found.update(second=_prepare(tmp_path)), name="second")
    first.start()
    assert started.wait(30)
    second.start()
    second.join(1.0)  # it is waiting for the lock, not preparing
    assert second.is_alive() and runs == ["first"]
    release.set()
    first.join(30)
    second.join(30)
    assert runs == ["first"] and found["first"] == found["second"]
    assert load_manifest(found["second"])["n_interactions"] == 10


def test_changed_source_or_config_rebuilds(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text((FIXTURES / "events.csv").read_text())
    out = _prepare(tmp_path, path=str(src))
    assert load_manifest(out)["n_interactions"] == 10
    with src.open("a") as f:
        f.write("40,100,3,pv,1.0,0,a\n")
    # other content, other hash: a new cache folder; the old one is left as it was
    changed = _prepare(tmp_path, path=str(src))
    assert changed != out and load_manifest(changed)["n_interactions"] == 11
    assert load_manifest(out)["n_interactions"] == 10
    assert config_hash(make_spec(path=str(src))) in changed.name
    other = _prepare(tmp_path, path=str(src), duplicates="first")
    assert other not in (out, changed)
    # an explicit out_dir is rebuilt in place when its source changed
    here = prepare({"name": "t", "path": str(src)}, tmp_path / "here", tmp_path / "cache")
    with src.open("a") as f:
        f.write("41,100,3,pv,1.0,0,a\n")
    assert prepare({"name": "t", "path": str(src)}, here, tmp_path / "cache") == here
    assert load_manifest(here)["n_interactions"] == 12


def test_hash_is_of_content_not_of_paths(tmp_path):
    """The same file under another folder (another machine, another RECSYS_SHARED_DATA_DIR) prepares
    into a folder of the same hash, which checkpoints carry as data_config_hash."""
    a, b = tmp_path / "a" / "log.csv", tmp_path / "elsewhere" / "other name.csv"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes((FIXTURES / "events.csv").read_bytes())
    out_a = prepare({"name": "t", "path": str(a)}, None, tmp_path / "cache1")
    out_b = prepare({"name": "t", "path": str(b)}, None, tmp_path / "cache2")
    assert out_a.name == out_b.name
    assert load_manifest(out_a)["config_hash"] == load_manifest(out_b)["config_hash"]
    assert config_hash(make_spec(path=str(a))) == config_hash(make_spec(path=str(b)))
    assert config_hash(make_spec(path=str(a))) != config_hash(make_spec(path=str(a), duplicates="first"))


def test_cache_hit_hashes_from_the_manifest_without_reading_the_source(tmp_path, monkeypatch):
    from recsys_mamba.data import cache

    out = _prepare(tmp_path)
    monkeypatch.setattr(cache, "_DIGESTS", {})  # a new process: nothing hashed yet

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must take the source's sha256 from the manifest")

    monkeypatch.setattr(cache, "sha256_file", boom)
    assert _prepare(tmp_path) == out


def test_explicit_out_dir_and_overwrite(tmp_path):
    spec = {"name": "t", "path": str(FIXTURES / "events.csv")}
    out = prepare(spec, tmp_path / "here", tmp_path / "cache")
    assert out == tmp_path / "here"
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    again = prepare(spec, out, tmp_path / "cache", overwrite=True)
    assert load_manifest(again)["created_at"] >= manifest["created_at"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["sequences.txt", "pairs.txt"])
def test_sequence_formats_end_to_end(tmp_path, name):
    fmt_name = "sequences" if name == "sequences.txt" else "sequence_pairs"
    out = _prepare(tmp_path, path=str(FIXTURES / name), format=fmt_name)
    seqs = pl.read_parquet(out / fmt.SEQUENCES)
    assert seqs["items"].list.len().to_list() == [3, 4, 3]


def test_in_memory_engine_gives_same_output(tmp_path):
    a = _prepare(tmp_path, columns=ALL_COLUMNS, ctr=CTR)
    b = _prepare(tmp_path, columns=ALL_COLUMNS, ctr=CTR, engine="in_memory")
    for name in (fmt.INTERACTIONS, fmt.SEQUENCES, fmt.CTR):
        assert pl.read_parquet(a / name).equals(pl.read_parquet(b / name))


def test_target_folder_default_is_keyed_by_hash(tmp_path):
    spec = make_spec()
    assert pipeline.target_folder(spec, None, tmp_path) == tmp_path / f"t-{config_hash(spec)}"


def test_labels_from_event_types(tmp_path):
    cols = {"event_type": "event_type"}
    ctr = {"label_from": "event_type", "positive_events": ["buy", "cart"]}
    out = _prepare(tmp_path, columns=cols, ctr=ctr, duplicates="exact")
    inter = pl.read_parquet(out / fmt.INTERACTIONS)
    assert inter["label"].to_list() == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    names = load_manifest(out)["event_types"]
    assert [names[i - 1] for i in inter["event_type_idx"].head(3)] == ["cart", "pv", "buy"]


def test_rating_events_put_each_rating_in_the_history(tmp_path):
    out = _prepare(
        tmp_path,
        format="movielens",
        path=str(FIXTURES / "u.data"),
        separator="\t",
        rating_events=True,
        ctr=CTR,
    )
    names = load_manifest(out)["event_types"]
    assert names == sorted(names) and all(n.startswith("rating=") for n in names)
    inter = pl.read_parquet(out / fmt.INTERACTIONS)
    shown = [float(names[i - 1].removeprefix("rating=")) for i in inter["event_type_idx"]]
    assert shown == inter["rating"].to_list()
    seqs = pl.read_parquet(out / fmt.SEQUENCES)
    assert seqs["event_types"].list.len().sum() == inter.height


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"columns": {"rating": None}}, "no rating column"),
        ({"columns": ALL_COLUMNS}, "data.columns.event_type"),
        ({"event_types": ["a"]}, "data.event_types=null"),
        ({"rating_events": "yes"}, "data.rating_events"),
    ],
)
def test_rating_events_misuse_is_a_clear_error(tmp_path, over, match):
    from recsys_mamba.errors import RecsysError

    with pytest.raises(RecsysError, match=match):
        _prepare(tmp_path, **{"columns": {"rating": "rating"}, "rating_events": True, **over})


def test_taobao_end_to_end(tmp_path):
    out = _prepare(
        tmp_path,
        format="taobao",
        path=str(FIXTURES / "taobao.csv"),
        split={"kind": "temporal", "test_time": 7},
    )
    m = load_manifest(out)
    assert m["n_categories"] == 3 and m["event_types"] == ["buy", "cart", "fav", "pv"]


def test_data_package_does_not_import_torch():
    code = "import sys, recsys_mamba.data, recsys_mamba.prepare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
