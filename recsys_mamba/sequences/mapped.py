"""The sequence store's arrays as memory-mapped files, written once per prepared folder.

`<prepared>/store/` holds one raw little-endian file per array (`<name>.bin`) and `store.json`
(format, the sequences.parquet it was built from: size and mtime, and each array's dtype and shape).
It is built on first use from sequences.parquet one row group at a time, so building is bounded by a
row group too, in a temporary sibling folder renamed into place when complete: a killed build leaves
only that sibling, which the next build sweeps, never a `store/` a later run would trust. Several
processes starting at once (DDP ranks, Ray workers) may each build one; the last rename wins and
every copy holds the same bytes. `RecDataModule.prepare_data` builds it before the ranks start.

A prepared folder that cannot be written (a read-only shared copy) gets its store under
`$RECSYS_STORE_DIR`, else `$XDG_CACHE_HOME/recsys_mamba/stores` (~/.cache), in a folder named by the
prepared folder's path and its sequences.parquet's size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys_mamba.data.cache import _write_failure, atomic_folder
from recsys_mamba.data.format import SEQUENCES
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import exclusive
from recsys_mamba.sequences.store import EVENT_ARRAYS, USER_ARRAYS, SequenceStore, event_dtypes, flatten

STORE = "store"
INDEX = "store.json"
FORMAT = 1
BATCH_USERS = 8192  # users per read of sequences.parquet (its row group size)
STORE_DIR_ENV = "RECSYS_STORE_DIR"
_COLUMNS = ("user_idx", *EVENT_ARRAYS)


def _source(sequences: Path) -> dict[str, Any]:
    stat = sequences.stat()
    return {"file": sequences.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _fallback_root() -> Path:
    if os.environ.get(STORE_DIR_ENV):
        return Path(os.environ[STORE_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "recsys_mamba" / "stores"


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried: permissions alone miss read-only mounts)."""
    probe = folder / f".store-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        return False
    return True


def store_folder(prepared: Path) -> Path:
    """Where the store of `prepared` lives: inside it, or in the user's cache when it is read-only."""
    prepared = Path(prepared)
    inside = prepared / STORE
    if inside.is_dir() or _writable(prepared):
        return inside
    source = _source(prepared / SEQUENCES)
    key = json.dumps([str(prepared.resolve()), source["bytes"], source["mtime_ns"]])
    return _fallback_root() / f"{prepared.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _current(folder: Path, sequences: Path) -> dict[str, Any] | None:
    """The index of a complete store built from this sequences.parquet, else None."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(index, dict)
        or index.get("format") != FORMAT
        or index.get("source") != _source(sequences)
    ):
        return None
    arrays = index.get("arrays", {})
    for name, info in arrays.items():
        path = folder / f"{name}.bin"
        expected = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            return None
    return index


def _map(folder: Path, index: dict[str, Any]) -> SequenceStore:
    arrays = {}
    for name, info in index["arrays"].items():
        shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
        if int(np.prod(shape)) == 0:  # an empty file cannot be mapped
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=shape)
    return SequenceStore(arrays)


def _write(tmp: Path, sequences: Path) -> dict[str, Any]:
    """Append every batch's arrays to `<tmp>/<name>.bin`; returns the index."""
    parquet = pq.ParquetFile(sequences)
    present = [c for c in _COLUMNS if c in parquet.schema_arrow.names]
    files: dict[str, Any] = {}
    fitting = event_dtypes(pl.scan_parquet(sequences))  # one type per array for every batch
    dtypes: dict[str, np.dtype] = {}
    events = users = 0
    last_user = -1
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_USERS, columns=present):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            arrays = flatten(frame, events, fitting)
            ids = arrays["users"]
            if ids.size and (int(ids[0]) <= last_user or np.any(np.diff(ids) <= 0)):
                raise RecsysError(
                    f"{sequences}: rows are not sorted by user_idx (or repeat one); prepare the data "
                    "again (python -m recsys_mamba.prepare ... overwrite=true)"
                )
            last_user = int(ids[-1]) if ids.size else last_user
            for name, values in arrays.items():
                if name not in files:
                    files[name] = open(tmp / f"{name}.bin", "wb")
                    dtypes[name] = values.dtype
                files[name].write(np.ascontiguousarray(values, dtype=dtypes[name].newbyteorder("<")).data)
            events += int(arrays["length"].sum())
            users += len(ids)
    finally:
        for f in files.values():
            f.close()
    if not files:  # no users at all: empty arrays of every kind
        empty = pl.from_arrow(parquet.schema_arrow.empty_table().select(present))
        assert isinstance(empty, pl.DataFrame)
        for name, values in flatten(empty, 0, fitting).items():
            (tmp / f"{name}.bin").write_bytes(b"")
            dtypes[name] = values.dtype
    for name in files:
        with open(tmp / f"{name}.bin", "rb") as f:
            os.fsync(f.fileno())
    shapes = {name: [events] for name in EVENT_ARRAYS if name in dtypes}
    shapes.update({name: [users] for name in USER_ARRAYS})
    shapes["split_first"] = [users, 3]
    return {
        "format": FORMAT,
        "source": _source(sequences),
        "arrays": {
            name: {"dtype": dtypes[name].newbyteorder("<").str, "shape": shapes[name]} for name in dtypes
        },
    }


def _hint(target: Path) -> str:
    return (
        f"free disk space beside {target.parent}, or set {STORE_DIR_ENV}= to a folder with room "
        "(the store needs about 14 bytes per event)"
    )


def build(prepared: Path, target: Path) -> None:
    """Write the store of `prepared` to `target` (replacing a stale one)."""
    sequences = prepared / SEQUENCES
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # stale: its sequences.parquet has changed
    try:
        with atomic_folder(target) as tmp:
            index = _write(tmp, sequences)
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    except RecsysError as err:
        # atomic_folder words a full disk for prepared data; say it for the store, from the OS's reason
        reason = _write_failure(err.__cause__) if err.__cause__ is not None else None
        if reason is None:
            raise
        raise RecsysError(
            f"{target}: cannot build the memory-mapped sequence store ({reason}); {_hint(target)}"
        ) from err


def open_store(prepared: Path | str) -> SequenceStore:
    """The memory-mapped store of a prepared folder, built first if it is missing or stale."""
    prepared = Path(prepared)
    sequences = prepared / SEQUENCES
    if not sequences.is_file():
        raise RecsysError(
            f"{sequences} is missing from the prepared data; re-run python -m recsys_mamba.prepare with "
            "overwrite=true (or delete the cache folder) so it is rebuilt"
        )
    target = store_folder(prepared)
    for _ in range(3):
        index = _current(target, sequences)
        if index is None:
            with exclusive(target):
                if _current(target, sequences) is None:  # not built by another process meanwhile
                    build(prepared, target)
            index = _current(target, sequences)
        try:
            return _map(target, index) if index is not None else _map_failed(target)
        except FileNotFoundError:  # another builder replaced it between the check and the mapping
            continue
    return _map_failed(target)


def _map_failed(target: Path) -> SequenceStore:
    raise RecsysError(
        f"{target}: the sequence store was replaced while being opened, three times; another process is "
        "rebuilding it: wait for it and retry, or delete the folder"
    )
