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
from recsys_mamba.files import TMP_MARK, sweep_temporaries, write_atomic, write_text_atomic

RERUN_HINT = "free disk space or choose another output=, then rerun: finished parts are kept and skipped"


def prepare_output(output: str | Path, shard: str = "0/1") -> Path:
    """The output folder, created; stale temporary files of this shard's killed run are removed (only
    this shard's: other shards may be writing theirs into the same folder right now)."""
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RecsysError(f"output={out} is not a writable folder ({err.strerror})") from err
    index, count = (int(x) for x in shard.split("/"))
    mine = f"-{index:05d}-of-{count:05d}"  # in every part and state file name of this shard

    def theirs(stale: Path) -> bool:
        return mine not in stale.name and not stale.name.startswith(f".{success_name(shard)}{TMP_MARK}")

    sweep_temporaries(out, keep=theirs)
    return out


def part_path(out: Path, prefix: str, j: int) -> Path:
    return out / f"{prefix}-{j:06d}.parquet"


def part_info(path: Path) -> dict[str, Any]:
    """A finished part as the `_SUCCESS` manifest lists it."""
    return {"file": path.name, "rows": pl.scan_parquet(path).select(pl.len()).collect().item()}


def run_parts(
    out: Path,
    prefix: str,
    chunks: list[Any],
    score: Callable[[Any], pl.DataFrame],
    progress: bool = True,
    pause_s: float = 0.0,
    first: int = 0,
) -> list[dict[str, Any]]:
    """Score each chunk into `<prefix>-<first + j>.parquet`, skipping parts a previous run finished."""
    import time

    parts = []
    for j, chunk in enumerate(tqdm(chunks, desc=prefix, unit="part", disable=not progress), start=first):
        path = part_path(out, prefix, j)
        if not path.is_file():
            frame = score(chunk)
            write_atomic(path, frame.write_parquet, hint=RERUN_HINT)
            time.sleep(pause_s)
        parts.append(part_info(path))
    return parts


def write_success(out: Path, name: str, parts: Iterable[dict[str, Any]], info: dict[str, Any]) -> Path:
    """The `_SUCCESS` manifest: job settings, counts and every part with its row count."""
    parts = list(parts)
    payload = {**info, "rows": sum(p["rows"] for p in parts), "parts": parts}
    path = out / name
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", hint=RERUN_HINT)
    return path


def success_name(shard: str) -> str:
    index, count = (int(x) for x in shard.split("/"))
    return "_SUCCESS" if count == 1 else f"_SUCCESS.shard-{index}-of-{count}"


def part_prefix(mode: str, shard: str) -> str:
    index, count = (int(x) for x in shard.split("/"))
    return f"{mode}-{index:05d}-of-{count:05d}"
