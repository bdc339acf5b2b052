"""Atomic file writes: a temporary sibling, then one rename, so a kill or a full disk never leaves
half a file where a finished one is expected (the previous file, if any, stays as it was)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import polars as pl

from recsys_mamba.errors import RecsysError

WRITABLE_HINT = "free disk space or choose a writable folder"


def write_atomic(path: Path, write: Callable[[Path], object], *, hint: str = WRITABLE_HINT) -> None:
    """`write(tmp)` then rename `tmp` onto `path`; on failure the temporary file is removed and the
    error names `path`, the reason and `hint` (what the user can do about it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, pl.exceptions.PolarsError) as err:  # Polars reports a full disk as a ComputeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is unwritable or gone: nothing was left there
        raise RecsysError(f"cannot write {path} ({getattr(err, 'strerror', None) or err}); {hint}") from err


def write_text_atomic(path: Path, text: str, *, hint: str = WRITABLE_HINT) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text), hint=hint)
