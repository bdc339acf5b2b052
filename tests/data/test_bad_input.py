"""Every kind of bad input gives a clear RecsysError and leaves no half-written folder behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys_mamba.data import prepare
from recsys_mamba.errors import RecsysError
from tests.data.conftest import FIXTURES, run_prepare_cli

HEADER = "user_id,item_id,timestamp\n"


def _fails(tmp_path: Path, text: str | None, match: str, suffix: str = ".csv", **over) -> None:
    src = tmp_path / f"in{suffix}"
    if text is not None:
        src.write_text(text)
    spec = {"name": "bad", "format": "events", "path": str(src), **over}
    cache = tmp_path / "cache"
    with pytest.raises(RecsysError, match=match):
        prepare(spec, None, cache)
    assert not cache.exists() or list(cache.iterdir()) == [], "a failed prepare left files behind"


def test_missing_column(tmp_path):
    _fails(
        tmp_path,
        "user,item_id,timestamp\n1,2,3\n",
        r"missing columns user_id \(column 'user_id'\).*data.columns",
    )


def test_misnamed_column_mapping(tmp_path):
    _fails(
        tmp_path,
        HEADER + "1,2,3\n",
        r"missing columns timestamp \(column 'ts'\)",
        columns={"timestamp": "ts"},
    )


def test_non_numeric_id(tmp_path):
    _fails(
        tmp_path,
        HEADER + "1,2,3\n1,x7,4\n",
        r"column 'item_id' must hold integers but has line 3: 'x7'.*id_type=str",
    )


def test_non_numeric_timestamp(tmp_path):
    _fails(
        tmp_path,
        HEADER + "1,2,3\n1,3,yesterday\n",
        r"column 'timestamp' must hold numbers but has line 3: 'yesterday'",
    )


def test_non_numeric_in_parquet(tmp_path):
    import polars as pl

    src = tmp_path / "in.parquet"
    pl.DataFrame({"user_id": ["1", "b"], "item_id": [1, 2], "timestamp": [1, 2]}).write_parquet(src)
    _fails(tmp_path, None, r"column 'user_id' must hold integers but has row 2: 'b'", suffix=".parquet")


def test_nulls_are_an_error(tmp_path):
    _fails(
        tmp_path,
        HEADER + "1,2,3\n1,,4\n2,5,6\n",
        r"column 'item_id' is empty in 1 rows \(data rows \[2\].*on_null=drop",
    )


def test_nulls_dropped_and_counted(tmp_path):
    from recsys_mamba.data import load_manifest

    src = tmp_path / "in.csv"
    src.write_text(HEADER + "1,2,3\n1,,4\n2,5,\n")
    m = load_manifest(prepare({"name": "n", "path": str(src), "on_null": "drop"}, None, tmp_path / "cache"))
    assert m["dropped"] == {"null_item_id": 1, "null_timestamp": 1} and m["n_interactions"] == 1


def test_empty_file(tmp_path):
    _fails(tmp_path, "", "the file is empty")


def test_header_only(tmp_path):
    _fails(tmp_path, HEADER, "no events left after step 'read'")


def test_missing_file(tmp_path):
    _fails(tmp_path, None, "no such file")


def test_not_the_declared_format(tmp_path):
    _fails(
        tmp_path,
        (FIXTURES / "sequences.txt").read_text(),
        "does not look like a MovieLens",
        format="movielens",
    )


def test_text_declared_as_parquet(tmp_path):
    _fails(tmp_path, HEADER + "1,2,3\n", "not a readable Parquet file", suffix=".parquet")


def test_filter_leaves_nothing(tmp_path):
    _fails(tmp_path, HEADER + "1,2,3\n1,3,4\n", "no events left after step 'filter'", filter={"min_item": 5})


def test_bad_config_values(tmp_path):
    _fails(tmp_path, HEADER + "1,2,3\n", r"duplicates='sometimes' is not one of", duplicates="sometimes")
    _fails(tmp_path, HEADER + "1,2,3\n", r"unknown keys \['colums'\]", colums={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RecsysError, match="cannot create the output folder"):
            prepare({"name": "x", "path": str(FIXTURES / "events.csv")}, locked / "out", tmp_path / "c")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_output_folder_even_for_root(tmp_path):
    with pytest.raises(RecsysError, match="cannot create the output folder"):
        prepare(
            {"name": "x", "path": str(FIXTURES / "events.csv")}, Path("/proc/self/recsys_out"), tmp_path / "c"
        )


def test_output_path_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecsysError, match="cannot create the output folder"):
        prepare({"name": "x", "path": str(FIXTURES / "events.csv")}, blocker / "out", tmp_path / "c")


def test_out_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(RecsysError, match="not prepared data"):
        prepare({"name": "x", "path": str(FIXTURES / "events.csv")}, tmp_path, tmp_path / "c")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli_bad_column_exits_nonzero_with_message(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(HEADER + "1,2,3\n1,abc,4\n")
    res = run_prepare_cli(tmp_path, "data=events", f"data.path={src}", f"out_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    assert "error:" in res.stderr and "line 3: 'abc'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_empty_file_and_missing_path(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("")
    res = run_prepare_cli(tmp_path, "data=sequences", f"data.path={src}")
    assert res.returncode == 2 and "the file is empty" in res.stderr


def test_cli_generic_config_without_path(tmp_path):
    res = run_prepare_cli(tmp_path, "data=events")
    assert res.returncode == 2 and "no input file; set data.path=" in res.stderr


def test_label_source_column_missing(tmp_path):
    _fails(
        tmp_path,
        HEADER + "1,2,3\n",
        r"needs column 'rating'.*data\.columns\.rating",
        ctr={"label_from": "rating"},
    )


def test_line_of_blanks_in_a_space_separated_file_names_the_line(tmp_path):
    # Found by the fuzz test: Polars splits "   " into 4 empty fields, so a blank-looking line is not
    # skipped the way an empty one is; the error must name it.
    _fails(tmp_path, "0 0\r\n   \n1 1\n", r"line 2", suffix=".txt", format="sequence_pairs", separator=" ")
