"""recsys-mamba: behaviour logs to event sequences, Mamba and attention encoders for next-click and CTR.

`from recsys_mamba import Recommender` (`recsys_mamba.api`): load a trained model and call it. It is
imported on first use, so the jobs (`python -m recsys_mamba.prepare`, ...) do not load it."""

from __future__ import annotations

from typing import Any

from recsys_mamba.allocator import retain_freed_pages
from recsys_mamba.openmp import prefer_passive_wait
from recsys_mamba.version import __version__

prefer_passive_wait()  # before torch or numba load their OpenMP runtimes (recsys_mamba.openmp)
retain_freed_pages()  # before Polars loads its jemalloc (recsys_mamba.allocator)

__all__ = ["Recommender", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Recommender":
        from recsys_mamba.api import Recommender

        return Recommender
    raise AttributeError(f"module 'recsys_mamba' has no attribute {name!r}")
