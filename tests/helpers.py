"""Helpers shared by the tests: fuzz settings, a full disk, a shrunken real config, a tiny prepared folder."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, settings

from recsys_mamba.config import compose

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

# Small enough that one epoch of any model takes about a second on one core.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    *SMALL_QUIET_RUN,
    "trainer.log_every_n_steps=1",
    "datamodule.batch_size=32",
    "datamodule.eval_batch_size=64",
]


# A small synthetic log: preparing it takes about a second, and it is cached for the whole session.
TINY_DATA = [
    "data.synthetic.n_users=160",
    "data.synthetic.n_items=120",
    "data.synthetic.n_categories=6",
    "data.synthetic.mean_events=30",
    "data.synthetic.max_events=80",
]


def tiny_cfg(
    out_dir: Path, overrides: list[str], cache_dir: Path | None = None, prepared: Path | None = None
):
    """The real train config, shrunk: tiny data and model, one short epoch."""
    extra = [f"paths.output_dir={out_dir}"]
    if cache_dir is not None:
        extra.append(f"paths.cache_dir={cache_dir}")
    if prepared is not None:
        extra.append(f"datamodule.prepared_dir={prepared}")
    other_data = any(o.startswith("data=") for o in overrides)
    return compose("train", overrides=TINY + ([] if other_data else TINY_DATA) + extra + overrides)


def write_prepared(
    folder: Path, n_users: int = 40, n_items: int = 30, n_categories: int = 5, seed: int = 0
) -> Path:
    """A prepared folder in the pipeline's format whose next item is mostly `item + 1` (learnable)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, ctr = [], []
    category = (np.arange(n_items + 1) % n_categories) + 1
    category[0] = 0
    for u in range(1, n_users + 1):
        n = int(rng.integers(4, 25))
        start = int(rng.integers(1, n_items + 1))
        items = [(start + i - 1) % n_items + 1 for i in range(n)]
        splits = [0] * (n - 2) + [1, 2]
        rows.append(
            {
                "user_idx": u,
                "items": items,
                "timestamps": list(range(n)),
                "categories": [int(category[i]) for i in items],
                "event_types": [1] * n,
                "labels": [1] * n,
                "splits": splits,
            }
        )
        for pos in range(1, n):
            ctr.append((u, items[pos], int(category[items[pos]]), 1, pos, pos, splits[pos], False))
            neg = int(rng.integers(1, n_items + 1))
            ctr.append((u, neg, int(category[neg]), int(neg == items[pos]), pos, pos, splits[pos], True))
    seq = pl.DataFrame(
        rows,
        schema_overrides={
            "items": pl.List(pl.Int32),
            "categories": pl.List(pl.Int32),
            "event_types": pl.List(pl.Int32),
            "labels": pl.List(pl.Int8),
            "splits": pl.List(pl.Int8),
            "timestamps": pl.List(pl.Int64),
        },
    )
    seq.write_parquet(folder / "sequences.parquet")
    flat = seq.explode(["items", "timestamps", "categories", "event_types", "labels", "splits"])
    train_counts = flat.filter(pl.col("splits") == 0).group_by("items").len()
    counts = np.zeros(n_items + 1, dtype=np.int64)
    counts[train_counts["items"].to_numpy()] = train_counts["len"].to_numpy()
    pl.DataFrame(
        {
            "item_idx": np.arange(1, n_items + 1),
            "item_id": [str(i) for i in range(1, n_items + 1)],
            "category_idx": category[1:],
            "count": counts[1:],
        }
    ).write_parquet(folder / "item_map.parquet")
    pl.DataFrame(
        ctr,
        schema={
            "user_idx": pl.Int32,
            "item_idx": pl.Int32,
            "category_idx": pl.Int32,
            "label": pl.Int8,
            "timestamp": pl.Int64,
            "hist_len": pl.Int32,
            "split": pl.Int8,
            "sampled_negative": pl.Boolean,
        },
        orient="row",
    ).write_parquet(folder / "ctr.parquet")
    manifest = {
        "format_version": 1,
        "n_users": n_users,
        "n_items": n_items,
        "n_categories": n_categories,
        "n_event_types": 1,
        "split": {"kind": "loo"},
        "ctr": {"negatives": 1},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
