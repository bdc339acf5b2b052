"""Atomic file writes, the one way every output of the project is written: a temporary sibling, synced
to disk, then one rename, so a kill or a full disk never leaves half a file where a finished one is
expected (the previous file, if any, stays as it was)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from recsys_mamba.errors import RecsysError

WRITABLE_HINT = "free disk space or choose a writable folder"
TMP_MARK = ".tmp-"  # temporary siblings are named .<name>.tmp-<pid>: a sweep can tell them apart


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """One writer of `target` at a time on this machine: an flock on `.<name>.lock` beside it (best
    effort on file systems without flock). A second writer waits, then finds the first one's result.
    The holder removes the lock file before it lets go, so none is left behind; a waiter that got the
    lock of a file removed meanwhile takes the new one."""
    path = target.parent / f".{target.name}.lock"
    while True:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a")
        except OSError:
            lock = None  # no lock where no file can be made: the write itself names the folder's problem
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            break  # no flock on this file system: go on without
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()  # its holder removed this file after it was opened here: lock the new one
    try:
        yield
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            lock.close()


def temporary_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (one per process, so two writers of
    the same file never share a temporary file)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return f"{err.strerror or err}, {errno.errorcode.get(err.errno, 'OSError')}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _fsync(path: Path) -> None:
    """Flush a written file to disk (a failure is an error: the data may not be there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable, where the filesystem can sync a folder at all."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder; the rename has happened either way
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path | str, write: Callable[[Path], object], *, hint: str = WRITABLE_HINT) -> None:
    """`write(tmp)` into a temporary sibling of `path`, synced, then renamed onto `path`.

    On failure the temporary file is removed and an OSError (or a Polars write error, which is how
    Polars reports a full disk) becomes a `RecsysError` naming `path`, the reason and `hint` (what
    the user can do about it). Anything else (a crash, KeyboardInterrupt) propagates unchanged."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # an unwritable or vanished folder has nothing left in it
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError | pl.exceptions.PolarsError):
            raise RecsysError(f"cannot write {path} ({_reason(err)}); {hint}") from err
        raise
    _fsync_folder(path.parent)  # the rename itself survives a power cut only once the folder is synced


def _write_bytes(tmp: Path, data: bytes | memoryview) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def write_bytes_atomic(path: Path | str, data: bytes | memoryview, *, hint: str = WRITABLE_HINT) -> None:
    write_atomic(path, lambda tmp: _write_bytes(tmp, data), hint=hint)


def write_text_atomic(path: Path | str, text: str, *, hint: str = WRITABLE_HINT) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text), hint=hint)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float as None: NaN is not JSON, and strict readers reject it."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        return json_safe(value.item())
    return value


def write_json_atomic(path: Path | str, payload: Any, *, hint: str = WRITABLE_HINT, indent: int = 2) -> None:
    """Strict JSON: NaN and infinities are written as null (`json_safe`)."""
    text = json.dumps(json_safe(payload), indent=indent, allow_nan=False, default=str) + "\n"
    write_text_atomic(path, text, hint=hint)


def write_texts_atomic(texts: Mapping[Path, str], *, hint: str = WRITABLE_HINT) -> None:
    """Several files as one: all are written to temporary siblings first and renamed only when every
    one was written, so a failure leaves every previous file as it was."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in texts.items():
            staged.append((temporary_sibling(path), path))
            staged[-1][0].write_text(text)
            _fsync(staged[-1][0])
    except BaseException as err:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise RecsysError(f"cannot write {staged[-1][1]} ({_reason(err)}); {hint}") from err
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    for folder in {path.parent for _, path in staged}:
        _fsync_folder(folder)


def sweep_temporaries(folder: Path, keep: Callable[[Path], bool] = lambda p: False) -> None:
    """Remove temporary siblings left by killed writers in `folder` (except those `keep` spares, e.g.
    another live process's)."""
    for stale in folder.glob(f".*{TMP_MARK}*"):
        if not keep(stale):
            with contextlib.suppress(OSError):
                stale.unlink()
