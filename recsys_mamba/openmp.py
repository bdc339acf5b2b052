"""OpenMP threads that sleep when idle, so numba's kernels and torch's ops do not spin against each other.

The numba scan and torch each bring their own copy of libgomp (numba's OpenMP pool links the system
libgomp, the torch wheel bundles another), so one process holds two thread pools on the same cores.
By default an idle libgomp thread spins for about 3 ms before it sleeps: after every torch op its
threads spin while numba's kernel wants the cores, and the other way round. A statically partitioned
kernel then waits for its slowest thread: on a machine shared with other jobs the scan ran slower with
2 threads than with 1. Passive waiting (sleep at once) removes that; what it costs a quiet machine and
what it saves a busy one is measured by `python -m recsys_mamba.bench contention` (BENCHMARKS.md).

libgomp reads these variables once, when it is loaded: torch's copy at `import torch`, numba's at the
first parallel kernel. So this runs on `import recsys_mamba`, before either, and only where the user
has not chosen: an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.
"""

from __future__ import annotations

import os

USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def prefer_passive_wait(environ: dict[str, str] | None = None) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set a wait policy; True when it was set here."""
    env = os.environ if environ is None else environ
    if any(name in env for name in USER_CHOICES):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
