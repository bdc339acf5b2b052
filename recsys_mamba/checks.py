"""Checks of single config values, shared by every entry point's config validation.

Each check returns the value (converted where that is lossless) or raises `RecsysError` naming the
key, the value and what it must be, so a bad override fails before any data is read or model built.
Hydra types override values itself (`x=1e3` is a float, `x=true` a bool, `x=2024` an int), so a path
given as a bare number is refused with a hint to quote it rather than guessed at.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys_mamba.errors import RecsysError

_MISSING = object()


def select(cfg: DictConfig, key: str, default: Any = _MISSING) -> Any:
    """`cfg`'s value at the dotted `key` (containers as plain Python); a broken interpolation or a
    missing required key is an error naming the key."""
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise RecsysError(f"{key}: {str(err).splitlines()[0]}; fix or drop that override") from None
    if value is _MISSING:
        raise RecsysError(f"{key} is missing from the config; set it with {key}=...")
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _fail(key: str, value: Any, what: str, example: Any) -> RecsysError:
    hint = f" (e.g. {key}={example})" if example is not None else ""
    return RecsysError(f"{key}={value!r} must be {what}{hint}")


def _range_text(minimum: float | None, maximum: float | None, above: float | None) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {above}")
    if minimum is not None:
        parts.append(f">= {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return " and ".join(parts)


def integer(
    value: Any,
    key: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
    example: Any = None,
) -> int | None:
    """An int (not a bool, not a float, even a whole one) within [minimum, maximum]; None if optional."""
    if value is None and optional:
        return None
    bounds = _range_text(minimum, maximum, None)
    what = "an integer" + (f" {bounds}" if bounds else "") + (" or null" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, value, what, example)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(key, value, what, example)
    return value


def number(
    value: Any,
    key: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
    example: Any = None,
) -> float | None:
    """A finite int or float (not a bool) in range (`above`/`below` are exclusive bounds)."""
    if value is None and optional:
        return None
    bounds = _range_text(minimum, maximum, above) + (f" and < {below}" if below is not None else "")
    what = "a finite number" + (f" {bounds.removeprefix(' and ')}" if bounds else "")
    what += " or null" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(key, value, what, example)
    if (
        (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise _fail(key, value, what, example)
    return float(value)


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false", "true")
    return value


def choice(value: Any, key: str, options: Sequence[Any]) -> Any:
    if isinstance(value, bool) or value not in options:
        raise RecsysError(f"{key}={value!r} is not one of {list(options)}")
    return value


def text(value: Any, key: str, *, optional: bool = False, example: Any = None) -> str | None:
    """A non-empty string; None if optional."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "a non-empty string" + (" or null" if optional else "")
        raise _fail(key, value, what + " (quote numbers: key='123')", example)
    return value


def path(value: Any, key: str, *, optional: bool = False) -> Path | None:
    """A path given as a non-empty string (`~` expanded); None if optional."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise RecsysError(
            f"{key}={value!r} must be a path"
            + (" or null" if optional else "")
            + f"; quote names that look like numbers or booleans: {key}='2024'"
        )
    return Path(value).expanduser()


def existing_file(value: Any, key: str, *, optional: bool = False, what: str = "a file") -> Path | None:
    """A path to a readable file."""
    found = path(value, key, optional=optional)
    if found is None:
        return None
    if not found.is_file():
        kind = "is a folder" if found.is_dir() else "does not exist"
        raise RecsysError(f"{key}={value} {kind}; pass {what}")
    if not os.access(found, os.R_OK):
        raise RecsysError(f"{key}={value} is not readable (permissions); pass {what} you can read")
    return found


def existing(value: Any, key: str, *, optional: bool = False, what: str = "a file or folder") -> Path | None:
    """A path to something that exists (file or folder) and is readable."""
    found = path(value, key, optional=optional)
    if found is None:
        return None
    if not found.exists():
        raise RecsysError(f"{key}={value} does not exist; pass {what}")
    if not os.access(found, os.R_OK):
        raise RecsysError(f"{key}={value} is not readable (permissions); pass {what} you can read")
    return found


def output_dir(value: Any, key: str, *, optional: bool = False) -> Path | None:
    """A folder that exists and is writable, or can be created under a writable existing folder."""
    found = path(value, key, optional=optional)
    if found is None:
        return None
    probe = found.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RecsysError(
            f"{key}={value} is not a writable folder: {probe} is a file (not writable as a folder); "
            "choose another path"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecsysError(
            f"{key}={value} is not a writable folder: {probe} is not writable for you; choose another path"
        )
    return found


def output_file(value: Any, key: str, *, optional: bool = False) -> Path | None:
    """A file path that is not a folder and whose folder exists writable or can be created."""
    found = path(value, key, optional=optional)
    if found is None:
        return None
    if found.is_dir():
        raise RecsysError(f"{key}={value} is a folder; pass a file name, e.g. {key}={found / 'out.json'}")
    output_dir(str(found.absolute().parent), f"the folder of {key}")
    return found


def integers(
    value: Any, key: str, *, minimum: int = 1, maximum: int | None = None, example: str
) -> list[int]:
    """A non-empty list of integers in range."""
    if not isinstance(value, list) or not value:
        raise RecsysError(f"{key}={value!r} must be a non-empty list of integers, e.g. {key}={example}")
    return [integer(v, f"{key}[{i}]", minimum=minimum, maximum=maximum) for i, v in enumerate(value)]  # type: ignore[misc]


def subset(value: Any, key: str, options: Sequence[str]) -> list[str]:
    """A non-empty list whose every item is one of `options`."""
    if not isinstance(value, list) or not value:
        raise RecsysError(f"{key}={value!r} must be a non-empty list of {list(options)}")
    for i, v in enumerate(value):
        choice(v, f"{key}[{i}]", options)
    return value


def seed(value: Any, key: str) -> int:
    """A random seed: numpy and Lightning take integers in [0, 2**32 - 1]."""
    return integer(value, key, minimum=0, maximum=2**32 - 1, example=42)  # type: ignore[return-value]
