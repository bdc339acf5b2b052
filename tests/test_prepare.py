"""`python -m recsys_mamba.prepare`: the command line around `recsys_mamba.data.prepare`."""

from __future__ import annotations

from recsys_mamba.data import load_manifest
from tests.data.conftest import FIXTURES, run_prepare_cli


def test_prepare_cli_writes_and_reuses(tmp_path):
    args = ("data=events", f"data.path={FIXTURES / 'events.csv'}")
    res = run_prepare_cli(tmp_path, *args)
    assert res.returncode == 0, res.stderr
    assert "users 3  items 5  interactions 10" in res.stdout
    folders = list((tmp_path / "data" / "cache").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("events-")
    created = load_manifest(folders[0])["created_at"]
    again = run_prepare_cli(tmp_path, *args)
    assert again.returncode == 0 and load_manifest(folders[0])["created_at"] == created


def test_prepare_cli_out_dir_and_error(tmp_path):
    out = tmp_path / "prepared"
    res = run_prepare_cli(
        tmp_path, "data=sequences", f"data.path={FIXTURES / 'sequences.txt'}", f"out_dir={out}"
    )
    assert res.returncode == 0, res.stderr
    assert load_manifest(out)["n_interactions"] == 10
    bad = run_prepare_cli(tmp_path, "data=events", f"data.path={tmp_path / 'missing.csv'}")
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
