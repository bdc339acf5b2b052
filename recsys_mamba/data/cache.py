"""Prepared-folder cache: source fingerprints and all-or-nothing folder writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys_mamba.data.format import FORMAT_VERSION, MANIFEST
from recsys_mamba.errors import RecsysError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def _unchanged(source: dict[str, Any]) -> bool:
    # size + mtime stand in for the sha256, so a cache hit never reads the data
    try:
        stat = Path(source["path"]).stat()
    except OSError:
        return False
    return stat.st_size == source["bytes"] and stat.st_mtime_ns == source["mtime_ns"]


def reusable(target: Path, cfg_hash: str) -> bool:
    """True when `target` holds a complete prepared folder of this config from unchanged sources."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("config_hash") == cfg_hash
        and all(_unchanged(s) for s in manifest.get("sources", []))
    )


def _check_replaceable(target: Path) -> None:
    if target.exists() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise RecsysError(
            f"{target}: out_dir exists and holds files that are not prepared data; "
            "choose an empty or new folder"
        )


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename,
    on any error it is removed, so a half-written folder is never left behind."""
    _check_replaceable(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise RecsysError(
            f"{target.parent}: cannot create the output folder ({err.strerror}); choose a writable out_dir= "
            "or paths.cache_dir="
        ) from err
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
