"""Faults during scoring: SIGKILL at random points then rerun (byte-identical output), a full disk, an
unwritable output. (File name: pytest needs unique test module basenames here.)"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import TMP_MARK
from tests.helpers import disk_full

REPO = Path(__file__).resolve().parents[2]
CHUNK = 4  # users per part: the tiny model's ~60 users make ~15 parts to kill between
PAUSE_S = 0.1  # after each part, so a run lasts long enough to be killed at many points


def cli(trained: dict[str, Path], out: Path, mode: str, *extra: str) -> list[str]:
    base = [f"ckpt_path={trained['ckpt']}", f"input={trained['events']}", f"output={out}", "progress=false"]
    return [
        sys.executable,
        "-m",
        "recsys_mamba.score",
        *base,
        f"mode={mode}",
        f"chunk_size={CHUNK}",
        f"hydra.run.dir={out.parent / 'hydra'}",
        *extra,
    ]


def files(folder: Path) -> dict[str, bytes]:
    """Every finished output file (temporary ones start with a dot) and its bytes."""
    if not folder.is_dir():  # killed before it made the folder
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def parts(folder: Path) -> int:
    return (
        sum(1 for p in folder.glob("*.parquet") if not p.name.startswith(("state-", ".")))
        if folder.is_dir()
        else 0
    )


def kill_at_random(cmd: list[str], out: Path, rng: random.Random, startup_s: float) -> str | None:
    """Start `cmd` and SIGKILL it at a random point: during start-up (model load, reading histories) or
    after a random number of new parts plus a random part of one part's time. None if it finished."""
    have = parts(out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if rng.random() < 0.3:
            where = "start-up"
            time.sleep(rng.uniform(0.0, startup_s))
        else:
            more = rng.randrange(0, 4)
            where = f"after part {have + more}"
            deadline = time.monotonic() + 120
            while parts(out) < have + more and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, PAUSE_S * 1.5))
        if proc.poll() is not None:
            return None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return where
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_and_rerun(trained, tmp_path: Path, mode: str, kills: int, seed: int, reliability) -> None:
    crashed = tmp_path / "out"
    started = time.monotonic()
    # The uninterrupted run writes to the same path (stream's _SUCCESS names its state file's path).
    subprocess.run(cli(trained, crashed, mode), cwd=REPO, check=True, capture_output=True, timeout=180)
    startup_s = time.monotonic() - started  # an upper bound of the start-up: no pause without pause_s
    expected = files(crashed)
    shutil.rmtree(crashed)
    rng = random.Random(seed)
    landed = []
    for _ in range(kills):
        where = kill_at_random(cli(trained, crashed, mode, f"pause_s={PAUSE_S}"), crashed, rng, startup_s)
        if where is None:
            continue
        landed.append(where)
        # Whatever is finished is final: the same bytes as the uninterrupted run's file of that name.
        left = files(crashed)
        lost = [n for n, data in left.items() if expected.get(n) != data]
        reliability.fault(f"score/sigkill/{mode}", survived=not lost, data_lost=bool(lost))
        assert not lost, f"killed {where}: {lost} differ from the uninterrupted run"
        assert "_SUCCESS" not in left or left == expected  # _SUCCESS only once every part is written
    print(f"score {mode} killed {landed}")
    assert landed, "no kill landed while the job was running"
    subprocess.run(cli(trained, crashed, mode), cwd=REPO, check=True, capture_output=True, timeout=180)
    got = files(crashed)
    assert got.keys() == expected.keys()
    assert [n for n in got if got[n] != expected[n]] == []
    assert [p.name for p in crashed.iterdir() if p.name.startswith(".")] == []


@pytest.mark.timeout(400)
def test_killed_topk_job_reruns_to_identical_bytes(trained, tmp_path, reliability):
    kill_and_rerun(trained, tmp_path, "topk", kills=3, seed=3, reliability=reliability)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("mode", "kills", "seed"), [("topk", 6, 4), ("stream", 4, 5), ("candidates", 3, 6)])
def test_many_killed_jobs_rerun_to_identical_bytes(trained, tmp_path, mode, kills, seed, reliability):
    kill_and_rerun(trained, tmp_path, mode, kills=kills, seed=seed, reliability=reliability)


# ---- disk full, unwritable output ----------------------------------------------------------------


def score_cfg(trained: dict[str, Path], out: Path):
    return compose(
        "score",
        overrides=[
            f"ckpt_path={trained['ckpt']}",
            f"input={trained['events']}",
            f"output={out}",
            "progress=false",
            f"chunk_size={CHUNK}",
        ],
        return_hydra_config=False,
    )


@pytest.mark.parametrize("victim", ["topk-00000-of-00001-000003.parquet", "_SUCCESS"])
def test_disk_full_is_a_clear_error_and_keeps_finished_parts(
    trained, tmp_path, monkeypatch, victim, reliability
):
    if victim.endswith(".parquet") and not Path("/dev/full").exists():
        pytest.skip("/dev/full is needed to make Polars hit a real ENOSPC")
    from recsys_mamba.scoring.job import score

    whole, out = tmp_path / "whole", tmp_path / "out"
    score(score_cfg(trained, whole))
    expected = files(whole)
    with monkeypatch.context() as m:
        disk_full(m, lambda p: p.name.startswith(f".{victim}{TMP_MARK}"))
        with pytest.raises(RecsysError) as err:
            score(score_cfg(trained, out))
    message = str(err.value)
    left = files(out)
    kept = bool(left) and all(expected.get(n) == data for n, data in left.items())
    clear = str(out / victim) in message and "No space left on device" in message and "output=" in message
    no_temp = not [p for p in out.iterdir() if p.name.startswith(".")]
    score(score_cfg(trained, out))  # space freed: the rerun finishes the job
    finished = files(out) == expected
    reliability.fault("disk-full/score", survived=clear and kept and finished, data_lost=not kept)
    assert clear, message
    assert kept and no_temp and "_SUCCESS" not in left
    assert finished


def test_unwritable_output_is_a_clear_error(trained, tmp_path, reliability):
    from recsys_mamba.scoring.job import score

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RecsysError) as err:
        score(score_cfg(trained, blocker / "sub"))
    clear = f"output={blocker / 'sub'}" in str(err.value) and "not a writable folder" in str(err.value)
    reliability.fault("unwritable/score", survived=clear and blocker.read_text() == "not a folder")
    assert clear, str(err.value)


def test_rerun_sweeps_only_its_own_shards_temporary_files(trained, tmp_path):
    from recsys_mamba.scoring.job import score

    out = tmp_path / "out"
    out.mkdir()
    # Shard 1 is writing a part right now; shard 0 was killed mid-write earlier.
    theirs = out / f".topk-00001-of-00002-000000.parquet{TMP_MARK}4242"
    ours = [
        out / f".topk-00000-of-00002-000000.parquet{TMP_MARK}4242",
        out / f"._SUCCESS.shard-0-of-2{TMP_MARK}4242",
    ]
    for path in (theirs, *ours):
        path.write_bytes(b"partial")
    cfg = score_cfg(trained, out)
    cfg.shard = "0/2"
    score(cfg)
    assert theirs.read_bytes() == b"partial"
    assert not any(p.exists() for p in ours)
    assert (out / "_SUCCESS.shard-0-of-2").is_file()
