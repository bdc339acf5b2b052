"""Output parts: written under a temporary name and renamed, so a finished part is always whole."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from recsys_mamba.errors import RecsysError


def prepare_output(output: str | Path) -> Path:
    """The output folder, created; stale temporary parts of a killed run are removed."""
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RecsysError(f"output={out} is not a writable folder ({err.strerror})") from err
    for stale in out.glob(".*.tmp"):
        stale.unlink()
    return out


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run_parts(
    out: Path,
    prefix: str,
    chunks: list[Any],
    score: Callable[[Any], pl.DataFrame],
    progress: bool = True,
    pause_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Score each chunk into `<prefix>-<j>.parquet`, skipping parts a previous run finished."""
    import time

    parts = []
    for j, chunk in enumerate(tqdm(chunks, desc=prefix, unit="part", disable=not progress)):
        path = out / f"{prefix}-{j:06d}.parquet"
        if not path.is_file():
            frame = score(chunk)
            write_atomic(path, frame.write_parquet)
            time.sleep(pause_s)
        parts.append({"file": path.name, "rows": pl.scan_parquet(path).select(pl.len()).collect().item()})
    return parts


def write_success(out: Path, name: str, parts: Iterable[dict[str, Any]], info: dict[str, Any]) -> Path:
    """The `_SUCCESS` manifest: job settings, counts and every part with its row count."""
    parts = list(parts)
    payload = {**info, "rows": sum(p["rows"] for p in parts), "parts": parts}
    path = out / name
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n"))
    return path


def success_name(shard: str) -> str:
    index, count = (int(x) for x in shard.split("/"))
    return "_SUCCESS" if count == 1 else f"_SUCCESS.shard-{index}-of-{count}"


def part_prefix(mode: str, shard: str) -> str:
    index, count = (int(x) for x in shard.split("/"))
    return f"{mode}-{index:05d}-of-{count:05d}"
