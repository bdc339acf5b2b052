"""The scoring job streams its input partition by partition (`scoring.partitions`): the parts and
`_SUCCESS` are byte-identical for any partition size, a rerun keeps finished parts without reading
their partitions again, bad rows are named by their row in the file, and a missing input or a folder
left by a killed run is handled cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.errors import RecsysError
from recsys_mamba.scoring import partitions
from tests.scoring.test_score_faults import files
from tests.scoring.test_scoring import job as run_job


@pytest.fixture(scope="module")
def inputs(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The events as a CSV with integer ids plus a cold user and an unknown item, and as a folder of
    three Parquet files; candidate pairs with a user the history does not have."""
    root = tmp_path_factory.mktemp("streamed")
    events = pl.read_parquet(trained["events"])
    extra = pl.DataFrame(
        {"user_id": ["999", events["user_id"][0]], "item_id": ["123456789", "987654"], "timestamp": [5, 7]},
        schema_overrides={"timestamp": events.schema["timestamp"]},
    ).with_columns(event_type=pl.lit(""))
    pl.concat([events, extra]).write_csv(root / "events.csv")
    folder = root / "events"
    folder.mkdir()
    for i, start in enumerate(range(0, len(events), len(events) // 3 + 1)):
        events.slice(start, len(events) // 3 + 1).write_parquet(folder / f"part-{i}.parquet")
    pairs = pl.concat(
        [events.select("user_id", "item_id").head(300), pl.DataFrame({"user_id": ["888"], "item_id": ["42"]})]
    )
    pairs.write_parquet(root / "pairs.parquet")
    paths = {"csv": root / "events.csv", "folder": folder, "pairs": root / "pairs.parquet"}
    return {**paths, "prepared": trained["prepared"]}


CASES = {
    "topk-csv": ("csv", ["top_k=3"]),
    "topk-folder-shard": ("folder", ["shard=1/3"]),
    "topk-prepared": ("prepared", ["shard=0/2"]),
    "candidates": ("pairs", ["mode=candidates"]),
    "candidates-history": ("pairs", ["mode=candidates", "shard=0/2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_any_partition_size_gives_the_same_bytes(trained, inputs, tmp_path: Path, case: str) -> None:
    which, extra = CASES[case]
    if case == "candidates-history":
        extra = [*extra, f"history={inputs['csv']}"]
    args = [f"input={inputs[which]}", "chunk_size=5", *extra]
    run_job(trained, tmp_path / "whole", *args)  # one partition: the whole input at once
    whole = files(tmp_path / "whole")
    run_job(trained, tmp_path / "small", *args, "partition_events=30")
    assert files(tmp_path / "small") == whole
    manifest = json.loads(next(v for k, v in whole.items() if k.startswith("_SUCCESS")))
    assert len(manifest["parts"]) >= 2


@pytest.mark.parametrize("which", ["folder", "file"])
def test_parquet_read_in_slices_gives_the_same_bytes(
    trained, inputs, tmp_path: Path, monkeypatch, which
) -> None:
    source = inputs["folder"] if which == "folder" else trained["events"]
    args = [f"input={source}", "chunk_size=5", "partition_events=200"]
    run_job(trained, tmp_path / "whole", *args)
    monkeypatch.setattr(partitions, "SLICE_ROWS", 97)  # the rows of every scan read 97 at a time
    assert len(partitions.Scan.of(source).pieces()) > 3
    run_job(trained, tmp_path / "sliced", *args)
    assert files(tmp_path / "sliced") == files(tmp_path / "whole")
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(trained["events"]).with_columns(
        pl.when(pl.int_range(pl.len()) == 150).then(None).otherwise(pl.col("item_id")).alias("item_id")
    ).write_parquet(bad)
    with pytest.raises(RecsysError, match=r"'item_id' is empty in 1 rows \(rows \[151\]"):
        run_job(trained, tmp_path / "bad", f"input={bad}")


def test_partitions_are_whole_parts_of_at_most_the_events_asked() -> None:
    users = pl.DataFrame({"user_id": [f"u{i}" for i in range(10)], "events": [5, 1, 1, 9, 2, 2, 2, 2, 30, 1]})
    cut = partitions.cut(users, 2, 10)  # parts of 6, 10, 4, 4 and 31 events
    assert [(p.first, p.users.to_list()) for p in cut] == [
        (0, ["u0", "u1"]),
        (1, ["u2", "u3"]),
        (2, ["u4", "u5", "u6", "u7"]),  # two parts together: 8 events
        (4, ["u8", "u9"]),  # more than asked, but a partition holds one part at least
    ]
    assert partitions.cut(users.head(0), 2, 10) == []


def test_a_rerun_reads_only_the_partitions_with_missing_parts(
    trained, inputs, tmp_path: Path, monkeypatch
) -> None:
    args = [f"input={inputs['csv']}", "chunk_size=5", "partition_events=30"]
    out = tmp_path / "out"
    run_job(trained, out, *args)
    expected = files(out)
    names = sorted(n for n in expected if n.endswith(".parquet"))
    (out / names[2]).unlink()  # as a killed run leaves it: some parts finished, one not yet
    (out / "_SUCCESS").unlink()
    (out / f".{names[3]}.tmp-12345").write_bytes(b"half a part")  # a killed writer's temporary file
    read = []
    original = partitions.Scan.rows_of
    monkeypatch.setattr(
        partitions.Scan, "rows_of", lambda self, users: read.append(users) or original(self, users)
    )
    run_job(trained, out, *args)
    assert files(out) == expected
    assert len(read) == 1  # the one partition with a missing part
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_rows_are_named_by_their_row_in_the_file(trained, tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    frame = pl.DataFrame({"user_id": ["a", "b", None, "c"], "item_id": [1.0, 2.5, 3.0, 4.0]})
    frame.write_parquet(path)
    with pytest.raises(RecsysError, match=r"'user_id' is empty in 1 rows \(rows \[3\]"):
        run_job(trained, tmp_path / "out", f"input={path}")
    frame.with_columns(pl.col("user_id").fill_null("z")).write_parquet(path)
    with pytest.raises(RecsysError, match=r"'item_id' holds numbers that are not integers \(rows \[2\]"):
        run_job(trained, tmp_path / "out", f"input={path}")
    csv = tmp_path / "events.csv"
    csv.write_text("user_id,item_id,timestamp\na,1,3\nb,2,x\n")
    with pytest.raises(RecsysError, match=r"'timestamp' must hold whole numbers.*rows \[2\]"):
        run_job(trained, tmp_path / "out", f"input={csv}")


def test_a_missing_or_unreadable_input_is_a_clear_error(trained, tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match="does not exist"):
        run_job(trained, tmp_path / "out", f"input={tmp_path / 'nope.parquet'}")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(RecsysError, match=r"input=.*broken.parquet: not a readable Parquet"):
        run_job(trained, tmp_path / "out", f"input={broken}")
    (tmp_path / "users.csv").write_text("user_id\n1\n")
    with pytest.raises(RecsysError, match=r"lacks column\(s\) \['item_id'\]; it has \['user_id'\]"):
        run_job(trained, tmp_path / "out", f"input={tmp_path / 'users.csv'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecsysError, match=r"a folder without \.parquet files"):
        run_job(trained, tmp_path / "out", f"input={empty}")
    assert not list((tmp_path / "out").glob("*.parquet"))
