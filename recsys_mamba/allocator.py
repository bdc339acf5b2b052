"""Polars' allocator keeps the memory it frees for a while, instead of handing it back at once.

Polars allocates through its own jemalloc, built to return freed pages to the kernel after 0.5 s
(dirty) and 1 s (muzzy): that keeps a process's memory low between queries. `prepare` frees and
allocates a bucket's worth of memory (hundreds of MB) every second or so, so the same memory was
handed back and faulted in again, zeroed by the kernel each time: most of the run's system time, and
on a virtual machine a page the guest gave back can cost the host a fault too. Keeping freed pages
for 5 s lets the next buckets reuse them; what it saves in time and costs in peak memory is measured
by `python -m recsys_mamba.bench scale` (BENCHMARKS.md, "Data pipeline at scale").

jemalloc reads `_RJEM_MALLOC_CONF` once, when Polars loads, so this runs on `import recsys_mamba`,
before Polars, and only where the user has not set the variable. A process that imported Polars
first keeps Polars' own setting.
"""

from __future__ import annotations

import os

VARIABLE = "_RJEM_MALLOC_CONF"
# how long jemalloc keeps freed pages before it returns them to the kernel, in milliseconds
MALLOC_CONF = "dirty_decay_ms:5000,muzzy_decay_ms:5000"


def retain_freed_pages(environ: dict[str, str] | None = None) -> bool:
    """Set `_RJEM_MALLOC_CONF` unless the user set it; True when it was set here."""
    env = os.environ if environ is None else environ
    if VARIABLE in env:
        return False
    env[VARIABLE] = MALLOC_CONF
    return True
