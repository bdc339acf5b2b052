"""What every benchmark shares: threads, a timer with repeats, paired ratios, the machine's description
and the JSON writer (not a subcommand: the leading underscore hides it from `python -m
recsys_mamba.bench`)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_mamba.files import write_json_atomic

SLOW_CALL_S = 2.0  # a call slower than this is timed once (its warm-up), to keep a run short


def set_threads(n: int) -> None:
    """Use `n` threads in numba's kernels (when installed) and in torch."""
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    torch.set_num_threads(n)  # after numba's, which can reset torch's thread count


def numba_threads() -> int | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall seconds of one call of `fn`."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(
    fn: Callable[[], object],
    repeats: int,
    *,
    warm_up: bool = True,
    device: torch.device | str | None = None,
) -> float:
    """Median wall seconds of `fn` over `repeats` calls, after one warm-up call (which is the result
    when it alone takes longer than SLOW_CALL_S); with warm_up=False every call is timed."""
    if warm_up:
        first = seconds(fn, device)
        if first > SLOW_CALL_S:
            return first
    return statistics.median(seconds(fn, device) for _ in range(max(1, repeats)))


def paired_ratio(first: list[float], second: list[float]) -> dict[str, float] | None:
    """Median and quartiles of second[i] / first[i]: timings taken back to back, so a slow spell of the
    machine falls on both and cancels in each ratio, which a ratio of the two medians does not do."""
    pairs = [b / a for a, b in zip(first, second, strict=False)]
    if not pairs:
        return None
    q1, median, q3 = np.percentile(pairs, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": len(pairs)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average says whether the machine was busy)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def write_result(path: Path | str, result: Any) -> Path:
    """The benchmark's JSON, written atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, hint="free disk space or pass another output path", indent=1)
    return path
