"""The scoring job with engine=ray on a local Ray cluster (`ray.init(num_cpus=2)`, started once per
module): the parts and `_SUCCESS` are byte-identical to engine=local, a worker that dies is retried,
one that keeps dying is a clear error with no `_SUCCESS`, and a run that was cut short reruns to the
same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from recsys_mamba.errors import RecsysError
from tests.scoring.test_score_faults import REPO, cli, files, parts
from tests.scoring.test_scoring import job as run_job

ray = pytest.importorskip("ray", reason="engine=ray needs the ray extra (pip install -e '.[dev]')")

SMALL = ["chunk_size=5", "partition_events=60"]  # ~60 users: about 6 partitions of 2 parts


@pytest.fixture(scope="module")
def cluster(ray_cluster: Path) -> Path:
    """The session's local Ray cluster (tests/conftest.py); its failpoint folder."""
    return ray_cluster


@pytest.fixture(scope="module")
def local_topk(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "topk"
    run_job(trained, out, *SMALL)
    return files(out)


def test_ray_gives_the_bytes_of_local(trained, cluster, local_topk, tmp_path: Path) -> None:
    run_job(trained, tmp_path / "ray", *SMALL, "engine=ray", "workers=2")
    assert files(tmp_path / "ray") == local_topk
    assert len(json.loads(local_topk["_SUCCESS"])["parts"]) >= 6


@pytest.mark.slow  # ~60 s on 2 busy cores: a new worker process loads torch and the model again
def test_a_dead_worker_is_retried(trained, cluster: Path, local_topk, tmp_path: Path, reliability) -> None:
    armed = cluster / "score-1"
    armed.touch()  # the worker scoring partition 1 dies in the middle of it, once
    run_job(trained, tmp_path / "ray", *SMALL, "engine=ray", "workers=2")
    fired = not armed.exists() and bool(list(cluster.glob("score-1.fired-*")))
    reliability.fault("score/ray-worker-died", survived=fired, data_lost=False)
    assert fired
    assert files(tmp_path / "ray") == local_topk


def test_ray_candidates_give_the_bytes_of_local(trained, cluster: Path, tmp_path: Path) -> None:
    args = [*SMALL, "mode=candidates", "shard=1/2"]
    run_job(trained, tmp_path / "local", *args)
    run_job(trained, tmp_path / "ray", *args, "engine=ray", "workers=1")
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_a_run_cut_short_reruns_to_the_same_output(
    trained, cluster: Path, local_topk, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # what a killed job leaves: some whole parts, a temporary file of a part being written, no _SUCCESS
    names = sorted(n for n in local_topk if n.endswith(".parquet"))
    for name in names[::3]:
        (out / name).write_bytes(local_topk[name])
    (out / f".{names[1]}.tmp-4242").write_bytes(b"half a part")
    run_job(trained, out, *SMALL, "engine=ray")
    assert files(out) == local_topk
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # ~40 s: the worker is started 4 times
def test_a_worker_that_keeps_dying_is_a_clear_error(
    trained, cluster: Path, tmp_path: Path, reliability
) -> None:
    (cluster / "score-0.always").touch()
    try:
        with pytest.raises(RecsysError) as err:
            run_job(trained, tmp_path / "out", *SMALL, "engine=ray", "workers=1")
    finally:
        (cluster / "score-0.always").unlink()
    message = str(err.value)
    clear = "engine=ray" in message and "rerun" in message and "engine=local" in message
    trusted = (tmp_path / "out" / "_SUCCESS").exists()
    reliability.fault("score/ray-worker-keeps-dying", survived=clear and not trusted, data_lost=trusted)
    assert clear, message
    assert not trusted


@pytest.mark.slow  # ~60 s: two command-line runs, each starting Ray actors
@pytest.mark.timeout(300)
def test_a_killed_ray_job_reruns_to_the_same_output(trained, cluster, tmp_path, reliability) -> None:
    run_job(trained, tmp_path / "local", "chunk_size=4", "partition_events=60")  # cli's chunk_size
    out = tmp_path / "out"
    cmd = cli(trained, out, "topk", "partition_events=60", "engine=ray", "workers=2")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([*cmd, "pause_s=0.5"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while parts(out) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver, in the middle of the partitions: Ray ends its actors
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    same = files(out) == files(tmp_path / "local")
    reliability.fault("score/ray-driver-killed", survived=same, data_lost=not same)
    assert same
