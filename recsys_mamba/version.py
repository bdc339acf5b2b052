"""The package version (one place: pyproject.toml reads it from here), and the source commit a run used."""

from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version, else this file's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsys-mamba")
    except PackageNotFoundError:
        return __version__


def _checkout() -> Path | None:
    """The source checkout this package runs from (editable install), None for an installed wheel: a
    wheel inside some other repository (a venv in a project folder) must not report that one's commit."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir() else None


def _git(*args: str) -> str | None:
    checkout = _checkout()
    if checkout is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the source checkout the package runs from; None outside a git checkout."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files of that checkout differ from its commit (the run used uncommitted code)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)
