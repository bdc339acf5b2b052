"""Prepared-folder cache: source fingerprints and all-or-nothing folder writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from recsys_mamba.data.format import FORMAT_VERSION, MANIFEST
from recsys_mamba.errors import RecsysError


def content_hash(settings: dict[str, Any]) -> str:
    """Short, stable hash of settings (with the output format version): what a cache folder is keyed by."""
    text = json.dumps({"format_version": FORMAT_VERSION, "data": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# (resolved path, size, mtime_ns) -> sha256 of the files this process has hashed
_DIGESTS: dict[tuple[str, int, int], str] = {}


def source_sha256(path: Path, known: Iterable[dict[str, Any]] = ()) -> str:
    """sha256 of a source file, read only when neither this process nor a `known` fingerprint
    ({path, bytes, mtime_ns, sha256}: a manifest's `sources`) has it for the file's current size and
    mtime: the same trust a cache hit already puts in size and mtime (`reusable`)."""
    try:
        stat = path.stat()
    except OSError as err:
        raise RecsysError(
            f"{path}: cannot read this data source ({err.strerror}); check data.path / data.item_attributes"
        ) from err
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        for source in known:
            same = (source.get("bytes"), source.get("mtime_ns")) == key[1:] and source.get("sha256")
            if same and str(Path(str(source.get("path"))).resolve()) == key[0]:
                _DIGESTS[key] = str(source["sha256"])
                break
        else:
            _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def known_sources(*folders: Path | str | None) -> list[dict[str, Any]]:
    """The source fingerprints recorded in the manifests of prepared folders directly under (or at)
    `folders`; unreadable manifests are skipped (they only save reading a source again)."""
    found: list[dict[str, Any]] = []
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        for manifest in [folder / MANIFEST, *folder.glob(f"*/{MANIFEST}")]:
            try:
                sources = json.loads(manifest.read_text()).get("sources")
            except (OSError, ValueError, AttributeError):
                continue
            found += [s for s in sources or [] if isinstance(s, dict)]
    return found


def describe_source(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "path": str(path),
        "sha256": source_sha256(path),
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
        isinstance(manifest, dict)
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("config_hash") == cfg_hash
        and all(_unchanged(s) for s in manifest.get("sources", []))
        # A file lost after the fact (deleted by hand, a partial copy of the folder) is caught here too.
        and all((target / name).is_file() for name in manifest.get("files", []))
    )


def _check_replaceable(target: Path) -> None:
    if target.exists() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise RecsysError(
            f"{target}: out_dir exists and holds files that are not prepared data; "
            "choose an empty or new folder"
        )


# Errors that mean "the output could not be written", as OSError errno or in a Polars error's text.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_POLARS_OS_ERROR = re.compile(r"os error (\d+)")


def _write_failure(err: BaseException) -> str | None:
    """Why writing failed (e.g. "No space left on device") when `err` is a write failure, else None."""
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        return err.strerror or str(err)
    # Polars raises its own errors, or a plain OSError without errno (e.g. from write_ipc)
    polars = type(err).__module__.startswith("polars") or isinstance(err, OSError)
    found = _POLARS_OS_ERROR.search(str(err)) if polars else None
    if found and int(found.group(1)) in _WRITE_ERRNOS:
        return os.strerror(int(found.group(1)))
    return None


# Siblings of a target made by `atomic_folder`: .<name>.<tmp|old>-<host>-<pid>-<random>.
_SIBLING = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _sweep(target: Path) -> None:
    """Clean up after a killed writer of `target` on this host: drop its temporary folder, and put back
    the previous folder it had moved aside if the kill came before the new one took its place."""
    host = _host()
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        m = _SIBLING.fullmatch(path.name)
        if not m or m["name"] != target.name or m["host"] != host or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not target.exists():
            with contextlib.suppress(OSError):
                os.replace(path, target)
            continue  # never delete the only copy of the previous folder
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename,
    on any error it is removed, so a half-written folder is never left behind."""
    _sweep(target)
    _check_replaceable(target)
    tmp = _sibling(target, "tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise RecsysError(
            f"{target.parent}: cannot create the output folder ({err.strerror}); choose a writable out_dir= "
            "or paths.cache_dir="
        ) from err
    old = None
    try:
        yield tmp
        if target.exists():
            old = _sibling(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            with contextlib.suppress(OSError):  # else the next run's _sweep puts it back
                os.replace(old, target)
        reason = _write_failure(err)
        if reason is None:
            raise
        raise RecsysError(
            f"{target}: writing the prepared data failed ({reason}); free disk space or choose another "
            f"out_dir= / paths.cache_dir=. Nothing was left half-written; {target} is as it was before"
        ) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
