"""`prepare` with engine=ray on a local Ray cluster (`ray.init(num_cpus=2)`, started once: seconds).

The outputs must be byte-identical to engine=local; a worker that dies mid-task is retried cleanly;
one that keeps dying is a clear error that leaves nothing behind; a killed job (the driver
SIGKILLed) reruns to the same output. The CLI runs reach the cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_mamba.bench.pipeline import generate_log
from recsys_mamba.data import prepare
from recsys_mamba.errors import RecsysError
from tests.data.conftest import ALL_COLUMNS, REPO, make_spec
from tests.data.test_fuzz_pipeline import folder_bytes

ray = pytest.importorskip("ray", reason="engine=ray needs the ray extra (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def cluster(ray_cluster: Path) -> Path:
    """The session's local Ray cluster (tests/conftest.py); its failpoint folder."""
    return ray_cluster


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 events with every optional column, as CSV."""
    rng = np.random.default_rng(5)
    n = 3000
    path = tmp_path_factory.mktemp("events") / "events.csv"
    pl.DataFrame(
        {
            "user_id": rng.zipf(1.3, n) % 200,  # some users with 1-2 events: the user filter drops them
            "item_id": rng.zipf(1.6, n) % 400,
            "timestamp": rng.integers(0, 50, n),
            "event_type": rng.choice(["pv", "cart", "buy"], n),
            "rating": rng.integers(1, 6, n).astype(float),
            "label": rng.integers(0, 2, n),
            "category": rng.choice(["a", "b", "c", "d"], n),
        }
    ).write_csv(path)
    return path


def spec_of(events: Path) -> dict:
    """Every stage: categories, event types, an iterative 3-core that drops rows, CTR negatives."""
    return make_spec(
        path=str(events),
        columns=ALL_COLUMNS,
        filter={"min_user": 3, "min_item": 3, "iterative": True},
        ctr={"label_from": "rating", "rating_threshold": 4.0, "negatives": 2, "seed": 3},
    )


@pytest.fixture(scope="module")
def local_bytes(events: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("local")
    out = folder_bytes(prepare(spec_of(events), root / "out", root / "cache", buckets=3))
    assert set(out["manifest.json"]["dropped"]) == {"min_item", "min_user"}  # the filter is exercised
    return out


def retried(tmp_path: Path, cluster: Path, events: Path, stages: list[str], reliability) -> dict:
    """Prepare with engine=ray while the workers of `stages` ("<task>-<bucket>") die once each."""
    armed = [cluster / name for name in stages]
    for path in armed:
        path.touch()
    out = prepare(spec_of(events), tmp_path / "ray", tmp_path / "cache", engine="ray", buckets=3)
    fired = all(not p.exists() and list(cluster.glob(f"{p.name}.fired-*")) for p in armed)
    reliability.fault("prepare/ray-worker-died", survived=fired, data_lost=False)
    assert fired, sorted(p.name for p in cluster.iterdir())
    return folder_bytes(out)


def test_ray_gives_the_bytes_of_local_and_retries_a_dead_worker(
    tmp_path, cluster, events, local_bytes, reliability
):
    # a worker that dies in the middle of a bucket's task: Ray runs the task again on a new one
    assert retried(tmp_path, cluster, events, ["clean-1"], reliability) == local_bytes


@pytest.mark.slow
def test_workers_dying_in_every_later_stage_are_retried(
    tmp_path, cluster, events, local_bytes, reliability
):
    stages = ["kcore-0", "vocabulary-1", "index-2", "negatives-1"]
    assert retried(tmp_path, cluster, events, stages, reliability) == local_bytes


def test_a_task_that_keeps_dying_is_a_clear_error(tmp_path, cluster, events, reliability):
    spec = spec_of(events)
    before = folder_bytes(prepare(spec, tmp_path / "out", tmp_path / "cache", buckets=2))
    (cluster / "index-1.always").touch()
    try:
        with pytest.raises(RecsysError) as err:
            prepare(spec, tmp_path / "out", tmp_path / "cache", overwrite=True, engine="ray", buckets=2)
    finally:
        (cluster / "index-1.always").unlink()
    message = str(err.value)
    clear = "index task of bucket 1 failed 4 times" in message and "engine=local" in message
    intact = folder_bytes(tmp_path / "out") == before and not list(tmp_path.glob(".out.*"))
    reliability.fault("prepare/ray-worker-keeps-dying", survived=clear and intact, data_lost=not intact)
    assert clear, message
    assert intact


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_ray_job_reruns_to_the_same_output(tmp_path, cluster, reliability):
    log = tmp_path / "log.parquet"
    generate_log(log, events=300_000, users=3_000, items=2_000, seed=1, chunk=50_000)
    data = ["data=events", f"data.path={log}", "data.columns.event_type=event_type", "data.filter.min_item=3"]
    spec = {"name": "killed", "path": str(log), "columns": {"event_type": "event_type"}}
    spec["filter"] = {"min_item": 3}
    expected = folder_bytes(prepare(spec, tmp_path / "expected", tmp_path / "cache", buckets=4))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.prepare",
        *data,
        "data.name=killed",
        f"out_dir={out}",
        "engine=ray",
        "buckets=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*/_scratch/buckets/clean-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of the bucket tasks
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".out.tmp-*"))  # a half-made folder, not trusted
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    same = folder_bytes(out) == expected
    swept = not list(tmp_path.glob(".out.*"))
    reliability.fault("prepare/ray-job-killed", survived=same and swept, data_lost=not same)
    assert same and swept
