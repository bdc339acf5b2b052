"""Helpers shared by the fuzz and fault tests."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("RECSYS_FUZZ_EXAMPLES", "0"))  # 0: each test's own default


def fuzz_settings(default: int) -> settings:
    """`default` examples (or $RECSYS_FUZZ_EXAMPLES), no deadline, no example database."""
    return settings(
        max_examples=FUZZ_EXAMPLES or default,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def disk_full(monkeypatch: pytest.MonkeyPatch, hit: Callable[[Path], bool]) -> None:
    """Writes (Parquet, Parquet sinks, Arrow IPC, text) to a path where `hit(path)` go to /dev/full:
    the real error a full disk gives (Polars
    reports it as a ComputeError carrying "os error 28", plain Python as OSError ENOSPC)."""
    real_parquet, real_text = pl.DataFrame.write_parquet, Path.write_text
    real_sink, real_ipc = pl.LazyFrame.sink_parquet, pl.DataFrame.write_ipc

    def write_parquet(self: pl.DataFrame, file, *args, **kwargs):
        return real_parquet(self, "/dev/full" if hit(Path(file)) else file, *args, **kwargs)

    def sink_parquet(self: pl.LazyFrame, path, *args, **kwargs):
        return real_sink(self, "/dev/full" if hit(Path(path)) else path, *args, **kwargs)

    def write_ipc(self: pl.DataFrame, file, *args, **kwargs):
        return real_ipc(self, "/dev/full" if hit(Path(file)) else file, *args, **kwargs)

    def write_text(self: Path, *args, **kwargs):
        if hit(self):
            if not Path("/dev/full").exists():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real_text(Path("/dev/full"), *args, **kwargs)
        return real_text(self, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", write_parquet)
    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", sink_parquet)
    monkeypatch.setattr(pl.DataFrame, "write_ipc", write_ipc)
    monkeypatch.setattr(Path, "write_text", write_text)


# Overrides every tiny training run in the tests shares: a small model, no sanity check, no progress bar.
SMALL_QUIET_RUN = [
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "model.d_model=16",
    "model.n_layers=1",
    "model.max_len=20",
]
