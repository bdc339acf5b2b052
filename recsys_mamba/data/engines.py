"""Where `prepare` runs its bucket tasks: in this process (`engine=local`) or as Ray tasks (`engine=ray`).

Both run the same functions (`recsys_mamba.data.tasks`) on the same files and give back their results
in bucket order, so the outputs do not depend on the engine (nor on how many buckets engine=local
works on at once, `workers`). Ray connects to the cluster at
`$RAY_ADDRESS` when it is set, joins a Ray already started in this process (tests start one with
`ray.init(num_cpus=2)`), and else starts a local one. Every task must see the run's scratch folder:
on a cluster, `out_dir` / `paths.cache_dir` must be on storage all nodes share.

A Ray worker that dies mid-task (killed, out of memory, node lost) is retried on another worker, up
to `RAY_RETRIES` times; the task rewrites its own files from its inputs, so a retry is clean. A task
that still fails is a clear `RecsysError`, and nothing is left in the output folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from recsys_mamba.errors import RecsysError

ENGINES = ("local", "ray")
# engine=local: buckets worked on at once (two keep both cores of a laptop busy)
DEFAULT_WORKERS = 2
RAY_RETRIES = 3


class Local:
    """Tasks in this process, `workers` buckets at a time on threads; results in bucket order.

    Polars and numpy release the GIL, but a task still has stretches that use one core (Python glue,
    numpy's sort, the IPC writes): a second task fills the other core then (BENCHMARKS.md, "Data
    pipeline at scale"). Each running task holds its bucket in memory, so peak memory grows with
    `workers`."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        if self.workers <= 1 or len(calls) <= 1:
            for args in calls:
                yield fn(*args)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"prepare-{fn.__name__}")
        try:
            # pool.map raises a task's error where its result is due: the first failing bucket in
            # bucket order, as one task after another would
            yield from pool.map(lambda args: fn(*args), calls)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed stage starts no further task

    def put(self, value: Any) -> Any:
        return value

    def close(self) -> None:
        pass


def connect() -> tuple[Any, bool]:
    """The `ray` module, connected: to `$RAY_ADDRESS` when set, to a Ray already started in this process,
    else to a new local one; and whether this call started it (then the caller shuts it down)."""
    try:
        import ray
    except ImportError as err:
        raise RecsysError(
            "engine=ray needs Ray: pip install 'recsys-mamba[ray]' (or run with engine=local)"
        ) from err
    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"RAY_ADDRESS={address}" if address else "a local Ray cluster"
        raise RecsysError(
            f"engine=ray: cannot connect to {where} ({err}); start the cluster (ray start --head) "
            "or fix RAY_ADDRESS, or run with engine=local"
        ) from err
    return ray, True


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class Ray:
    """Tasks as Ray tasks, all of a stage at once; results are taken in bucket order."""

    name = "ray"

    def __init__(self, target: str) -> None:
        self.ray, self.started = connect()
        self.target = target
        self.remote = self.ray.remote(max_retries=RAY_RETRIES, retry_exceptions=False)(_run)

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        refs = [self.remote.options(name=f"{fn.__name__}").remote(fn, *args) for args in calls]
        taken = 0
        try:
            for ref, args in zip(refs, calls, strict=True):
                yield self._get(ref, fn.__name__, args)
                taken += 1
        except BaseException:
            for ref in refs[taken + 1 :]:  # a stage that failed: stop the tasks not yet taken
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)
            raise

    def _get(self, ref: Any, name: str, args: tuple[Any, ...]) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause
            if isinstance(cause, BaseException):
                raise cause from None  # a RecsysError, a full disk, ...: as engine=local would raise it
            raise
        except (ray.exceptions.RayError, OSError) as err:
            bucket = args[1] if len(args) > 1 else "?"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RecsysError(
                f"{self.target}: engine=ray: the {name} task of bucket {bucket} failed "
                f"{RAY_RETRIES + 1} times ({type(err).__name__}: {first}); nothing was written there. Rerun "
                "the command (it starts over), give the Ray workers more memory, or use engine=local"
            ) from err

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def start(name: str, target: Any, workers: int = DEFAULT_WORKERS) -> Local | Ray:
    """The engine `name`; `workers` applies to engine=local (Ray places its tasks itself)."""
    if name not in ENGINES:
        raise RecsysError(f"engine={name!r} is not one of {list(ENGINES)}")
    return Local(workers) if name == "local" else Ray(str(target))
