"""Config schemas: what every key of an entry point's config may hold, declared once.

A `Schema` lists `Rule`s (a key and the `Kind` of value it takes) and `Relation`s (a condition over
several keys). `Schema.validate(cfg)` checks a composed config before any data is read or a model
built, and fails on the first bad value with a message naming the key, the value and what it must be
(`checks`); the fuzz test of the overrides draws its keys and its expectations from the same
declarations. The YAML files under conf/ hold the defaults and say in a comment what each key does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.errors import RecsysError


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Kind:
    """What a value must be. `check` raises `RecsysError` (naming `key`) for a value that is not."""

    optional = False
    values = "scalars"  # what the fuzz test draws: scalars | paths | lists

    def check(self, value: Any, key: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Kind):
    minimum: int | None = None
    maximum: int | None = None
    optional: bool = False
    example: Any = None
    exclude: tuple[int, ...] = ()  # values refused even inside the range
    also: tuple[Any, ...] = ()  # values accepted besides integers (e.g. "auto")

    def check(self, value: Any, key: str) -> None:
        if value in self.also and not isinstance(value, bool | int | float):
            return
        checks.integer(
            value,
            key,
            minimum=self.minimum,
            maximum=self.maximum,
            optional=self.optional,
            example=self.example,
        )
        if value in self.exclude and is_int(value):
            raise RecsysError(f"{key}={value} is not allowed; use e.g. {key}={self.example}")


@dataclass(frozen=True)
class Num(Kind):
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive bounds
    below: float | None = None
    optional: bool = False
    example: Any = None

    def check(self, value: Any, key: str) -> None:
        checks.number(
            value,
            key,
            minimum=self.minimum,
            maximum=self.maximum,
            above=self.above,
            below=self.below,
            optional=self.optional,
            example=self.example,
        )


@dataclass(frozen=True)
class Bool(Kind):
    optional: bool = False

    def check(self, value: Any, key: str) -> None:
        if value is None and self.optional:
            return
        checks.boolean(value, key)


@dataclass(frozen=True)
class Seed(Kind):
    """numpy and Lightning take seeds in [0, 2**32 - 1]."""

    def check(self, value: Any, key: str) -> None:
        checks.seed(value, key)


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[Any, ...] = ()
    as_text: bool = False  # compare the value's text (Hydra reads precision=32 as the int 32)

    def check(self, value: Any, key: str) -> None:
        if self.as_text:
            if str(value) not in self.options:
                raise RecsysError(f"{key}={str(value)!r} is not one of {self.options}")
            return
        checks.choice(value, key, self.options)


@dataclass(frozen=True)
class Text(Kind):
    optional: bool = False
    example: Any = None

    def check(self, value: Any, key: str) -> None:
        checks.text(value, key, optional=self.optional, example=self.example)


@dataclass(frozen=True)
class PathTo(Kind):
    """A path; `must` says what has to be there: any (only a path), file, exists (file or folder),
    folder, prepared (a folder with a manifest.json), out_dir (writable or creatable folder), out_file."""

    must: str = "any"
    optional: bool = False
    what: str = ""  # what to pass instead, for the message
    empty_is_none: bool = False  # '' means no path too
    values = "paths"

    def check(self, value: Any, key: str) -> None:
        if self.empty_is_none and value == "":
            value = None
        if self.must == "file":
            checks.existing_file(value, key, optional=self.optional, what=self.what or "a file")
        elif self.must == "exists":
            checks.existing(value, key, optional=self.optional, what=self.what or "a file or folder")
        elif self.must == "folder":
            found = checks.existing(value, key, optional=self.optional, what=self.what or "a folder")
            if found is not None and not found.is_dir():
                raise RecsysError(f"{key}={value} is a file; pass {self.what or 'a folder'}")
        elif self.must == "out_dir":
            checks.output_dir(value, key, optional=self.optional)
        elif self.must == "out_file":
            checks.output_file(value, key, optional=self.optional)
        else:
            found = checks.path(value, key, optional=self.optional)
            if self.must == "prepared" and found is not None and not (found / "manifest.json").is_file():
                raise RecsysError(
                    f"{key}={found} holds no manifest.json; point it at a folder written by "
                    "python -m recsys_mamba.prepare, or set it to null"
                )


@dataclass(frozen=True)
class PathList(Kind):
    """A list of paths, each of which must be what `item` says (null or [] allowed unless `required`)."""

    item: PathTo = PathTo("file")
    required: bool = False
    example: str = "[a,b]"
    values = "lists"

    def check(self, value: Any, key: str) -> None:
        if value is None and not self.required:
            return
        if not isinstance(value, list) or (self.required and not value):
            what = "a non-empty list" if self.required else "a list"
            raise RecsysError(f"{key}={value!r} must be {what} of paths, e.g. {key}={self.example}")
        for i, v in enumerate(value):
            self.item.check(v, f"{key}[{i}]")


@dataclass(frozen=True)
class IntList(Kind):
    """A list of integers in range, non-empty unless `allow_empty`."""

    minimum: int = 1
    maximum: int | None = None
    example: str = "[1,2]"
    allow_empty: bool = False
    optional: bool = False
    values = "lists"

    def check(self, value: Any, key: str) -> None:
        if (self.allow_empty and value == []) or (self.optional and value is None):
            return
        checks.integers(value, key, minimum=self.minimum, maximum=self.maximum, example=self.example)


@dataclass(frozen=True)
class NumList(Kind):
    """A list of finite numbers, each above `above`, of exactly `length` items when given."""

    above: float | None = None
    length: int | None = None
    example: str = "[1,2]"
    values = "lists"

    def check(self, value: Any, key: str) -> None:
        ok = isinstance(value, list) and (self.length is None or len(value) == self.length) and bool(value)
        if not ok or not all(is_number(v) and (self.above is None or v > self.above) for v in value):
            size = f"{self.length} " if self.length else "a list of "
            bound = f" > {self.above}" if self.above is not None else ""
            raise RecsysError(f"{key}={value!r} must be {size}numbers{bound}, e.g. {key}={self.example}")


@dataclass(frozen=True)
class Subset(Kind):
    """A non-empty list whose every item is one of `options`."""

    options: tuple[str, ...] = ()
    values = "lists"

    def check(self, value: Any, key: str) -> None:
        checks.subset(value, key, self.options)


@dataclass(frozen=True)
class Batches(Kind):
    """Lightning's limit_*_batches: null, a count of batches (int >= 0) or a fraction in [0, 1]."""

    def check(self, value: Any, key: str) -> None:
        if value is None or (is_int(value) and value >= 0):
            return
        checks.number(value, key, minimum=0, maximum=1, example=0.1)


@dataclass(frozen=True)
class Rule:
    """`key` holds a `kind` of value; with `present_only`, only where the composed config has the key
    (an encoder's own sizes, a head's own options)."""

    key: str
    kind: Kind
    present_only: bool = False

    def applies(self, cfg: DictConfig | dict[str, Any]) -> bool:
        return not self.present_only or _present(cfg, self.key)

    def validate(self, cfg: DictConfig | dict[str, Any]) -> None:
        if self.applies(cfg):
            self.kind.check(_select(cfg, self.key), self.key)


@dataclass(frozen=True)
class Relation:
    """A condition between keys whose own rules passed: `holds(*values)`; else the error is
    `message.format(k0=..., v0=..., k1=..., v1=...)` (each key and its value)."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    message: str
    present_only: bool = False

    def applies(self, cfg: DictConfig | dict[str, Any]) -> bool:
        return not self.present_only or all(_present(cfg, k) for k in self.keys)

    def accepts(self, values: Sequence[Any]) -> bool:
        return bool(self.holds(*values))

    def validate(self, cfg: DictConfig | dict[str, Any]) -> None:
        if not self.applies(cfg):
            return
        values = [_select(cfg, k) for k in self.keys]
        if not self.accepts(values):
            names = {f"k{i}": k for i, k in enumerate(self.keys)} | {f"v{i}": v for i, v in enumerate(values)}
            raise RecsysError(self.message.format(**names))


@dataclass(frozen=True)
class Check:
    """A check that is neither a single value nor a plain relation (e.g. whether a GPU is there);
    `fn(cfg)` raises `RecsysError` naming the key."""

    fn: Callable[[Any], None]

    def validate(self, cfg: DictConfig | dict[str, Any]) -> None:
        self.fn(cfg)


Entry = Rule | Relation | Check


@dataclass(frozen=True)
class Schema:
    """An entry point's rules, checked in order (the first failure is the one reported)."""

    entries: tuple[Entry, ...] = field(default_factory=tuple)

    def __init__(self, *parts: Iterable[Entry] | Entry) -> None:
        flat: list[Entry] = []
        for part in parts:
            if isinstance(part, Rule | Relation | Check):
                flat.append(part)
            elif isinstance(part, Schema):
                flat.extend(part.entries)
            else:
                flat.extend(part)
        object.__setattr__(self, "entries", tuple(flat))

    @property
    def rules(self) -> list[Rule]:
        return [e for e in self.entries if isinstance(e, Rule)]

    @property
    def relations(self) -> list[Relation]:
        return [e for e in self.entries if isinstance(e, Relation)]

    def under(self, prefix: str) -> Schema:
        """The same rules for a config nested at `prefix` (e.g. a model config at models.mamba)."""
        moved: list[Entry] = []
        for e in self.entries:
            if isinstance(e, Rule):
                moved.append(replace(e, key=f"{prefix}.{e.key}"))
            elif isinstance(e, Relation):
                moved.append(replace(e, keys=tuple(f"{prefix}.{k}" for k in e.keys)))
            else:
                raise RecsysError(f"schema: a Check cannot be moved under {prefix}")
        return Schema(moved)

    def validate(self, cfg: DictConfig | dict[str, Any]) -> None:
        """Raise `RecsysError` naming the first key whose value breaks a rule."""
        for entry in self.entries:
            entry.validate(cfg)


def _select(cfg: DictConfig | dict[str, Any], key: str) -> Any:
    if isinstance(cfg, DictConfig):
        return checks.select(cfg, key, default=None)
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _present(cfg: DictConfig | dict[str, Any], key: str) -> bool:
    group, _, name = key.rpartition(".")
    node = (
        (checks.select(cfg, group, default=None) if isinstance(cfg, DictConfig) else _select(cfg, group))
        if group
        else cfg
    )
    return isinstance(node, dict | DictConfig) and name in node


__all__ = [
    "Batches",
    "Bool",
    "Check",
    "Choice",
    "Int",
    "IntList",
    "Kind",
    "Num",
    "NumList",
    "PathList",
    "PathTo",
    "Relation",
    "Rule",
    "Schema",
    "Seed",
    "Subset",
    "Text",
    "is_int",
    "is_number",
]
