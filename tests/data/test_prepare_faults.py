"""Faults during `prepare`: SIGKILL at random points, a crash between two files, a full disk, an
unwritable out_dir. Afterwards no cache folder may be trusted unless complete and correct, and the
next run must rebuild and succeed. (File name: pytest needs unique test module basenames here.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.config import compose
from recsys_mamba.data import cache, pipeline, prepare
from recsys_mamba.data import format as fmt
from recsys_mamba.data.spec import config_hash, normalize
from recsys_mamba.data.synthetic import LOG_FILE, ensure_log
from recsys_mamba.errors import RecsysError
from tests.data.conftest import ALL_COLUMNS, FIXTURES, REPO, make_spec, run_prepare_cli
from tests.helpers import disk_full

# Manifest keys that differ between two correct runs.
VOLATILE = ("created_at", "prepare_seconds", "sources", "package_version")


def synthetic_spec() -> dict:
    return normalize(compose("prepare", return_hydra_config=False).data)


def snapshot(folder: Path) -> dict[str, object]:
    """A prepared folder's content: every Parquet file's frame, the manifest without volatile keys."""
    out: dict[str, object] = {}
    for path in sorted(folder.iterdir()):
        if path.name == fmt.MANIFEST:
            manifest = json.loads(path.read_text())
            out[path.name] = {k: v for k, v in manifest.items() if k not in VOLATILE}
        elif path.suffix == ".parquet":
            out[path.name] = pl.read_parquet(path)
        else:
            out[path.name] = path.read_bytes()
    return out


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(x.equals(b[k]) if isinstance(x, pl.DataFrame) else x == b[k] for k, x in a.items())


def trusted_but_wrong(cache_dir: Path, cfg_hash: str, reference: dict[str, object]) -> list[str]:
    """Cache folders a later run would reuse (or, for the generated log, read) that are not correct."""
    bad = []
    for folder in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        try:
            if folder.name.startswith("synthetic-log-"):
                log = folder / LOG_FILE  # the pipeline trusts the generated log once the file exists
                wrong = log.is_file() and not pl.read_parquet(log).equals(reference["log"])
            else:
                wrong = cache.reusable(folder, cfg_hash) and not same(snapshot(folder), reference["prepared"])
        except Exception:  # a torn file that is trusted fails to read in many ways
            wrong = True
        if wrong:
            bad.append(folder.name)
    return bad


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The default synthetic data set prepared without faults, and how long each half took."""
    root = tmp_path_factory.mktemp("reference")
    spec = synthetic_spec()
    started = time.perf_counter()
    log = ensure_log(spec["synthetic"], root)
    generated = time.perf_counter()
    out = prepare(spec, None, root)
    seconds = {"log": generated - started, "prepare": time.perf_counter() - generated}
    return {"prepared": snapshot(out), "log": pl.read_parquet(log), "seconds": seconds}


def cli(cache_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "recsys_mamba.prepare",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={cache_dir.parent / 'run'}",
        *args,
    ]


def kill_during_prepare(cache_dir: Path, delay: float) -> str | None:
    """Start the CLI, SIGKILL it `delay` s after it makes its first temporary folder; what it was writing
    then ("log", "prepared" or "between"), None if it had ended."""

    def temporary() -> set[str]:
        return {p.name for p in cache_dir.iterdir() if ".tmp-" in p.name} if cache_dir.is_dir() else set()

    earlier = temporary()  # a killed run's leftovers, until the next run sweeps them
    proc = subprocess.Popen(cli(cache_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not temporary() - earlier:
            if proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            return None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        busy = temporary() - earlier
        return "log" if any("-log-" in n for n in busy) else "prepared" if busy else "between"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_and_rerun(tmp_path: Path, reference: dict[str, object], reliability, seed: int, kills: int) -> None:
    """`kills` killed runs on one cache folder, each checked, then a run to the end."""
    rng = random.Random(seed)
    cache_dir = tmp_path / "cache"
    cfg_hash = config_hash(synthetic_spec())
    landed = []
    for _ in range(kills):
        # The first kill aims at generating the log, later ones at what is left to do.
        seconds = reference["seconds"]
        log_done = any(cache_dir.glob(f"synthetic-log-*/{LOG_FILE}"))
        window = seconds["prepare"] + (0.0 if log_done else seconds["log"])
        phase = kill_during_prepare(cache_dir, rng.uniform(0.0, seconds["log"] if not landed else window))
        if phase is None:
            continue
        landed.append(phase)
        bad = trusted_but_wrong(cache_dir, cfg_hash, reference)
        reliability.fault("prepare/sigkill", survived=not bad, data_lost=bool(bad))
        assert not bad, f"trusted after a kill while writing the {phase} folder: {bad}"
    print(f"prepare killed while writing: {landed}")
    assert landed, "no kill landed while prepare was running"
    done = subprocess.run(cli(cache_dir), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    prepared = cache_dir / f"synthetic-{cfg_hash}"
    assert same(snapshot(prepared), reference["prepared"])
    assert not trusted_but_wrong(cache_dir, cfg_hash, reference)
    # The killed runs' temporary folders were swept by the one that finished.
    assert not [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.timeout(300)
def test_killed_prepare_leaves_nothing_trusted(tmp_path, reference, reliability):
    kill_and_rerun(tmp_path, reference, reliability, seed=7, kills=3)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [11, 12])
def test_many_killed_prepares_leave_nothing_trusted(tmp_path, reference, reliability, seed):
    kill_and_rerun(tmp_path, reference, reliability, seed=seed, kills=6)


# ---- crashes between files (in-process) ----------------------------------------------------------

FILES = [fmt.INTERACTIONS, fmt.SEQUENCES, fmt.USER_MAP, fmt.ITEM_MAP, fmt.CATEGORY_MAP, fmt.CTR]


class Crash(Exception):
    """Stands in for the process dying at that point (the folder is left as the crash leaves it)."""


def crash_on(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Raise `Crash` when the pipeline is about to write `point` (a file name) or rename ("replace:N")."""
    if point.startswith("replace:"):
        nth, calls = int(point.split(":")[1]), []
        real = os.replace

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == nth:
                raise Crash(point)
            return real(src, dst)

        monkeypatch.setattr(cache.os, "replace", replace)
        return
    real_write = pipeline._write
    real_text = Path.write_text

    def write(work: Path, name: str, df: pl.DataFrame) -> str:
        if name == point:
            raise Crash(point)
        return real_write(work, name, df)

    def write_text(self: Path, *args, **kwargs):
        if self.name == point:
            raise Crash(point)
        return real_text(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_write", write)
    monkeypatch.setattr(Path, "write_text", write_text)


def events_spec() -> dict:
    return make_spec(columns=ALL_COLUMNS, ctr={"label_from": "rating", "rating_threshold": 4.0})


@pytest.mark.parametrize("point", [*FILES, fmt.MANIFEST, "replace:1"])
def test_crash_between_files_leaves_nothing_trusted(tmp_path, monkeypatch, point, reliability):
    spec = events_spec()
    expected = snapshot(prepare(spec, None, tmp_path / "reference"))
    assert set(FILES) | {fmt.MANIFEST} == set(expected)  # every file the pipeline writes is a crash point
    cache_dir = tmp_path / "cache"
    with monkeypatch.context() as m:
        crash_on(m, point)
        with pytest.raises(Crash):
            prepare(spec, None, cache_dir)
    trusted = [p.name for p in cache_dir.iterdir() if cache.reusable(p, config_hash(spec))]
    left = [p.name for p in cache_dir.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    out = prepare(spec, None, cache_dir)
    ok = not trusted and not left and same(snapshot(out), expected)
    reliability.fault("prepare/crash-between-files", survived=ok, data_lost=bool(trusted))
    assert not trusted and not left
    assert same(snapshot(out), expected)


@pytest.mark.parametrize("point", [fmt.SEQUENCES, fmt.MANIFEST, "replace:1", "replace:2"])
def test_crash_while_overwriting_keeps_the_previous_folder(tmp_path, monkeypatch, point, reliability):
    spec = events_spec()
    out = prepare(spec, tmp_path / "prepared", tmp_path / "cache")
    before = snapshot(out)
    created = json.loads((out / fmt.MANIFEST).read_text())["created_at"]
    with monkeypatch.context() as m:
        crash_on(m, point)
        with pytest.raises(Crash):
            prepare(spec, out, tmp_path / "cache", overwrite=True)
    intact = (
        same(snapshot(out), before)
        and json.loads((out / fmt.MANIFEST).read_text())["created_at"] == created
        and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    )
    reliability.fault("prepare/crash-while-overwriting", survived=intact, data_lost=not intact)
    assert intact


def test_folder_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    spec = events_spec()
    out = prepare(spec, tmp_path / "prepared", tmp_path / "cache")
    before = snapshot(out)
    # What a kill between atomic_folder's two renames leaves: the old folder aside, a dead writer's pid.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    aside = tmp_path / f".prepared.old-{cache._host()}-{int(dead.stdout)}-0123abcd"
    os.replace(out, aside)
    assert not cache.reusable(out, config_hash(spec))
    assert prepare(spec, out, tmp_path / "cache") == out
    assert same(snapshot(out), before) and not aside.exists()


def test_manifest_missing_a_listed_file_is_not_trusted(tmp_path):
    spec = events_spec()
    out = prepare(spec, None, tmp_path / "cache")
    (out / fmt.CTR).unlink()
    assert not cache.reusable(out, config_hash(spec))
    assert (prepare(spec, None, tmp_path / "cache") / fmt.CTR).is_file()


# ---- disk full, unwritable out_dir ---------------------------------------------------------------


@pytest.mark.parametrize("victim", [fmt.SEQUENCES, fmt.MANIFEST])
def test_disk_full_is_a_clear_error_and_keeps_the_previous_folder(tmp_path, monkeypatch, victim, reliability):
    if not Path("/dev/full").exists() and victim != fmt.MANIFEST:
        pytest.skip("/dev/full is needed to make Polars hit a real ENOSPC")
    spec = events_spec()
    out = prepare(spec, tmp_path / "prepared", tmp_path / "cache")
    before = snapshot(out)
    with monkeypatch.context() as m:
        disk_full(m, lambda p: p.name == victim)
        with pytest.raises(RecsysError) as err:
            prepare(spec, out, tmp_path / "cache", overwrite=True)
    message = str(err.value)
    intact = same(snapshot(out), before) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    clear = str(out) in message and "No space left on device" in message and "out_dir=" in message
    reliability.fault("disk-full/prepare", survived=intact and clear, data_lost=not intact)
    assert clear, message
    assert intact


def test_unwritable_out_dir_is_a_clear_error(tmp_path, reliability):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = run_prepare_cli(
        tmp_path, "data=events", f"data.path={FIXTURES / 'events.csv'}", f"out_dir={blocker / 'sub'}"
    )
    clear = res.returncode == 2 and f"error: {blocker}" in res.stderr and "Traceback" not in res.stderr
    reliability.fault("unwritable/prepare", survived=clear and blocker.read_text() == "not a folder")
    assert clear, res.stderr[-2000:]
    assert "out_dir=" in res.stderr


# ---- buckets: a run killed in the middle of a bucket, a full disk, a log too big for the disk -----


def bucket_spec(path: Path) -> dict:
    return normalize({"name": "b", "path": str(path), "columns": ALL_COLUMNS, "filter": {"min_item": 2}})


@pytest.fixture
def bucket_log(tmp_path: Path) -> Path:
    """A CSV log of 361 events, 40 users: every one of 4 buckets gets users, and one item is seen once,
    so the frequency filter (min_item=2) has a row to drop and runs its passes."""
    rows = ["user_id,item_id,timestamp,event_type,rating,label,category"]
    events = [(u, i) for u in range(40) for i in range(9)]
    rows += [f"{u},{(u * 7 + i) % 23},{i},pv,{1 + i % 5}.0,{i % 2},c{i % 3}" for u, i in events]
    rows.append("0,99,9,pv,1.0,0,c0")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("stage", ["clean-2", "kcore-1", "index-3"])
def test_a_run_killed_in_a_bucket_leaves_no_bucket_a_rerun_trusts(tmp_path, bucket_log, stage, reliability):
    spec = bucket_spec(bucket_log)
    expected = snapshot(prepare(spec, tmp_path / "expected", tmp_path / "cache", buckets=4))
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    (failpoints / stage).touch()  # the process dies (os._exit) when that bucket's task starts
    out = tmp_path / "out"
    args = [
        "data=events",
        f"data.path={bucket_log}",
        "data.name=b",
        *(f"data.columns.{k}={v}" for k, v in ALL_COLUMNS.items()),
        "data.filter.min_item=2",
        f"out_dir={out}",
        "buckets=4",
    ]
    env = {**os.environ, "RECSYS_PREPARE_FAILPOINTS": str(failpoints)}
    command = cli(tmp_path / "cache", *args)
    killed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=120)
    left = list(tmp_path.glob(".out.tmp-*/_scratch/buckets/*.arrow"))
    assert killed.returncode == 70 and left and not out.exists(), killed.stderr[-2000:]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ok = same(snapshot(out), expected) and not list(tmp_path.glob(".out.*"))
    reliability.fault("prepare/killed-in-a-bucket", survived=ok, data_lost=not ok)
    assert ok


@pytest.mark.parametrize(
    ("rare_item", "threshold", "passes"),
    [
        (False, "data.filter.min_item=2", False),  # every item seen twice or more: nothing to drop
        (True, "data.filter.min_item=2", True),  # item 99 is seen once
        (False, "data.filter.min_user=10", True),  # 39 users have 9 events
    ],
)
def test_the_frequency_filter_makes_a_pass_only_when_a_count_is_under_its_threshold(
    tmp_path, bucket_log, rare_item, threshold, passes
):
    log = bucket_log
    if not rare_item:
        log = tmp_path / "common.csv"
        log.write_text("".join(bucket_log.read_text().splitlines(keepends=True)[:-1]))
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    for b in range(4):  # any pass over any bucket kills the run
        (failpoints / f"kcore-{b}.always").touch()
    args = ["data=events", f"data.path={log}", "data.name=b", threshold, f"out_dir={tmp_path / 'out'}"]
    args += [*(f"data.columns.{k}={v}" for k, v in ALL_COLUMNS.items()), "buckets=4"]
    env = {**os.environ, "RECSYS_PREPARE_FAILPOINTS": str(failpoints)}
    res = subprocess.run(cli(tmp_path / "cache", *args), cwd=REPO, env=env, capture_output=True, timeout=120)
    assert res.returncode == (70 if passes else 0), res.stderr[-2000:]
    if not passes:
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["n_interactions"] == 360 and not manifest["dropped"]


def test_disk_full_in_a_bucket_is_a_clear_error(tmp_path, monkeypatch, bucket_log, reliability):
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is needed to make Polars hit a real ENOSPC")
    spec = bucket_spec(bucket_log)
    out = prepare(spec, tmp_path / "prepared", tmp_path / "cache", buckets=4)
    before = snapshot(out)
    with monkeypatch.context() as m:
        disk_full(m, lambda p: p.name.startswith(".clean-00002.arrow"))  # bucket 2's cleaned events
        with pytest.raises(RecsysError) as err:
            prepare(spec, out, tmp_path / "cache", overwrite=True, buckets=4)
    message = str(err.value)
    intact = same(snapshot(out), before) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    clear = str(out) in message and "No space left on device" in message and "out_dir=" in message
    reliability.fault("disk-full/prepare-bucket", survived=intact and clear, data_lost=not intact)
    assert clear, message
    assert intact


def test_a_log_too_big_for_the_disk_is_refused_before_any_work(tmp_path, monkeypatch, bucket_log):
    from recsys_mamba.data import buckets

    real = buckets.shutil.disk_usage
    monkeypatch.setattr(buckets.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(RecsysError, match=r"needs about .* GiB of free disk .*Nothing was written"):
        prepare(bucket_spec(bucket_log), tmp_path / "out", tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
