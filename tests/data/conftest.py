"""Shared helpers for the data pipeline tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recsys_mamba.data.spec import normalize

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    return Path(os.environ.get("RECSYS_SHARED_DATA_DIR", REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture
def shared() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(
            f"real data folder {root} is absent (set RECSYS_SHARED_DATA_DIR or check out ../shared/data)"
        )
    return root


def make_spec(**over: Any) -> dict[str, Any]:
    """A normalized data config for the fixture event log, with overrides."""
    base: dict[str, Any] = {"name": "t", "format": "events", "path": str(FIXTURES / "events.csv")}
    return normalize({**base, **over})


ALL_COLUMNS = {
    "user_id": "user_id",
    "item_id": "item_id",
    "timestamp": "timestamp",
    "event_type": "event_type",
    "rating": "rating",
    "label": "label",
    "category": "category",
}


def run_prepare_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m recsys_mamba.prepare ARGS` with its data and run folders under `tmp`."""
    env = {**os.environ, "RECSYS_DATA_DIR": str(tmp / "data")}
    return subprocess.run(
        [sys.executable, "-m", "recsys_mamba.prepare", *args, f"hydra.run.dir={tmp / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
