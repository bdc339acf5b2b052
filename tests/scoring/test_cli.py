"""`python -m recsys_mamba.score` as a process: crash recovery and clear errors on bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest


def cli(trained: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    base = [f"ckpt_path={trained['ckpt']}", f"input={trained['events']}", f"output={out}", "progress=false"]
    return [sys.executable, "-m", "recsys_mamba.score", *base, *overrides]


def read(folder: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted(folder.glob("*.parquet"))])


@pytest.mark.timeout(120)
def test_killed_job_resumes_to_the_same_output(trained, tmp_path: Path) -> None:
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    subprocess.run(cli(trained, whole, "chunk_size=8"), check=True, capture_output=True)
    proc = subprocess.Popen(cli(trained, crashed, "chunk_size=8", "pause_s=0.5"), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(crashed.glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "_SUCCESS").exists()
    subprocess.run(cli(trained, crashed, "chunk_size=8"), check=True, capture_output=True)
    assert read(crashed).equals(read(whole))
    assert (crashed / "_SUCCESS").read_text() == (whole / "_SUCCESS").read_text()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_columns", "lacks column"),
        ("unknown_checkpoint", "does not exist"),
        ("unwritable_output", "not a writable folder"),
        ("bad_shard", "shard="),
    ],
)
def test_bad_input_exits_with_a_clear_error(trained, tmp_path: Path, case: str, message: str) -> None:
    overrides: list[str] = []
    if case == "missing_columns":
        pl.DataFrame({"user_id": ["1"], "product": ["2"]}).write_parquet(tmp_path / "bad.parquet")
        overrides.append(f"input={tmp_path / 'bad.parquet'}")
    elif case == "unknown_checkpoint":
        overrides.append(f"ckpt_path={tmp_path / 'nope.ckpt'}")
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("")
        overrides.append(f"output={tmp_path / 'file' / 'sub'}")
    else:
        overrides.append("shard=3/2")
    done = subprocess.run(cli(trained, tmp_path / "out", *overrides), capture_output=True, text=True)
    assert done.returncode == 2
    assert "error:" in done.stderr and message in done.stderr
