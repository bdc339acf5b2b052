"""The data config: defaults, checks and the hash that keys the cache."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.data import attributes
from recsys_mamba.data.cache import content_hash, source_sha256
from recsys_mamba.data.synthetic import DEFAULTS as SYNTHETIC
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Bool, Check, Int, Kind, Num, Relation, Rule, Schema, Seed

FORMATS = ("events", "movielens", "recbole", "sequences", "sequence_pairs", "taobao", "synthetic")
OPTIONAL_COLUMNS = ("timestamp", "event_type", "rating", "label", "category")

DEFAULTS: dict[str, Any] = {
    "name": "data",
    "format": "events",
    "path": None,
    "separator": None,
    "has_header": True,
    "columns": {
        "user_id": "user_id",
        "item_id": "item_id",
        "timestamp": "timestamp",
        "event_type": None,
        "rating": None,
        "label": None,
        "category": None,
    },
    "id_type": "int",
    "event_types": None,
    "rating_events": False,
    "on_null": "error",
    "duplicates": "keep",
    "time_window": {"start": None, "end": None},
    "filter": {"min_user": 0, "min_item": 0, "iterative": True},
    "split": {"kind": "loo", "anchor": "all", "min_events": 3, "valid_time": None, "test_time": None},
    "ctr": None,
    "engine": "streaming",
    "synthetic": None,
    "item_attributes": None,
}

# keys added to DEFAULTS after the first release; config_hash leaves them out while they are null
_ADDED_KEYS = ("item_attributes",)
# keys naming an input file: the hash takes the file's content, not its path
SOURCE_KEYS = ("path", "item_attributes")

CTR_DEFAULTS: dict[str, Any] = {
    "label_from": "rating",
    "rating_threshold": 4.0,
    "positive_events": None,
    "negatives": 0,
    "seed": 0,
}

_CHOICES = {
    "format": FORMATS,
    "id_type": ("int", "str"),
    "on_null": ("error", "drop"),
    "duplicates": ("keep", "exact", "first", "last"),
    "engine": ("streaming", "in_memory"),
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def normalize(cfg_data: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain dict with every key present; raises `RecsysError` on unknown keys or values."""
    raw = OmegaConf.to_container(cfg_data, resolve=True) if isinstance(cfg_data, DictConfig) else cfg_data
    raw = copy.deepcopy(dict(raw))
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise RecsysError(f"data config: unknown keys {unknown}; known keys are {sorted(DEFAULTS)}")
    _check_sections(raw)
    spec = _merge(DEFAULTS, raw)
    for key, allowed in _CHOICES.items():
        if spec[key] not in allowed:
            raise RecsysError(f"data config: {key}={spec[key]!r} is not one of {list(allowed)}")
    if spec["format"] != "synthetic" and spec["path"] in (None, "", "???"):
        raise RecsysError(f"data config {spec['name']!r}: no input file; set data.path=/path/to/file")
    split = spec["split"]
    if split["kind"] not in ("loo", "temporal"):
        raise RecsysError(f"data config: split.kind={split['kind']!r} is not one of ['loo', 'temporal']")
    if split["kind"] == "temporal" and split["test_time"] is None:
        raise RecsysError("data config: a temporal split needs split.test_time=<unix seconds>")
    if split["anchor"] not in ("all", "positive"):
        raise RecsysError(f"data config: split.anchor={split['anchor']!r} is not one of ['all', 'positive']")
    if spec["ctr"] is not None:
        if not isinstance(spec["ctr"], dict):
            raise RecsysError(f"data.ctr={spec['ctr']!r} must be null or a mapping: {{label_from: rating}}")
        spec["ctr"] = _merge(CTR_DEFAULTS, spec["ctr"])
        if spec["ctr"]["label_from"] not in ("rating", "event_type", "label", "none"):
            raise RecsysError(
                f"data config: ctr.label_from={spec['ctr']['label_from']!r} is not one of "
                "['rating', 'event_type', 'label', 'none']"
            )
    check_values(spec)
    return spec


def _check_sections(raw: dict[str, Any]) -> None:
    """Sections (filter, split, ...) must stay mappings, with only known keys: a typo such as
    data.filter.min_users=5 would otherwise be ignored without a word."""
    for key, default in DEFAULTS.items():
        if not isinstance(default, dict) or key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, dict):
            raise RecsysError(f"data.{key}={value!r} must be a mapping with keys {sorted(default)}")
        unknown = sorted(set(value) - set(default))
        if unknown:
            raise RecsysError(f"data.{key}: unknown keys {unknown}; known keys are {sorted(default)}")


class Names(Kind):
    """null, or a list of distinct non-empty names (event types)."""

    optional = True

    def check(self, value: Any, key: str) -> None:
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise RecsysError(f"{key}={value!r} must be null or a list of names, e.g. {key}=[pv,cart,buy]")
        if len(set(value)) != len(value):
            raise RecsysError(f"{key}={value!r} names a type twice; list each once")


class FolderName(Kind):
    """A name that becomes a cache folder's name: text without '/' or '\\'."""

    def check(self, value: Any, key: str) -> None:
        name = checks.text(value, key, example="mydata")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise RecsysError(f"{key}={name!r} names the cache folder: no '/' or '\\', e.g. {key}=mydata")


class AttributesPath(Kind):
    """null, or an attributes file whose suffix names its format."""

    optional = True
    values = "paths"

    def check(self, value: Any, key: str) -> None:
        path = checks.path(value, key, optional=True)
        if path is not None and path.suffix.lower() not in attributes.SUFFIXES:
            raise RecsysError(
                f"{key}={value!r}: the file's suffix names its format and must be one of "
                f"{list(attributes.SUFFIXES)} "
                '(.json: {"<item id>": [attribute, ...]}; .csv/.tsv/.parquet: columns item_id, attribute)'
            )


def _separator(cfg: dict[str, Any]) -> None:
    spec = cfg["data"]
    sep = spec["separator"]
    if sep is None:
        return
    if not isinstance(sep, str) or not sep:
        raise RecsysError(f"data.separator={sep!r} must be null or a string, e.g. data.separator=';'")
    # polars splits on one byte; MovieLens' '::' is read as two one-byte separators
    if len(sep.encode()) != 1 and not (spec["format"] == "movielens" and sep == "::"):
        raise RecsysError(
            f"data.separator={sep!r} must be one ASCII character (or '::' for format=movielens), "
            "e.g. ',', ';' or a tab"
        )


def _path(cfg: dict[str, Any]) -> None:
    if cfg["data"]["format"] != "synthetic":
        checks.path(cfg["data"]["path"], "data.path")


def _columns(cfg: dict[str, Any]) -> None:
    columns = cfg["data"]["columns"]
    if not isinstance(columns, dict):
        raise RecsysError(f"data.columns={columns!r} must map fields to column names")
    unknown = sorted(set(columns) - set(DEFAULTS["columns"]))
    if unknown:
        known = list(DEFAULTS["columns"])
        raise RecsysError(f"data.columns: unknown fields {unknown}; known fields are {known}")
    for field, column in columns.items():
        checks.text(column, f"data.columns.{field}", optional=field in OPTIONAL_COLUMNS, example=field)


def _known_keys(section: str, known: dict[str, Any]) -> Check:
    def check(cfg: dict[str, Any]) -> None:
        value = cfg["data"].get(section)
        if value is None:
            return
        if not isinstance(value, dict):
            raise RecsysError(f"data.{section}={value!r} must be a mapping of settings")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise RecsysError(f"data.{section}: unknown keys {unknown}; known keys are {sorted(known)}")

    return Check(check)


_SYNTHETIC_INTS = ("n_users", "n_items", "n_categories", "min_events", "days")
_SYNTHETIC_SHARES = ("drift", "session_drift", "session_break", "p_current_interest", "p_other_tastes")
_SYNTHETIC_WEIGHTS = ("pop_exponent", "ctr_bias", "interest_weight", "recent_weight", "quality_weight")

# Types and ranges of every value of a normalized data config (seen as {"data": spec}, the synthetic
# generator's settings merged with their defaults), so a bad override fails before any file is read.
DATA = Schema(
    Rule("data.name", FolderName()),
    Check(_path),
    Check(_separator),
    Rule("data.has_header", Bool()),
    Check(_columns),
    Rule("data.event_types", Names()),
    Rule("data.rating_events", Bool()),
    Relation(
        ("data.rating_events", "data.columns.event_type"),
        lambda ratings, column: not ratings or column is None,
        "{k0}=true makes the event types from the ratings, but {k1}={v1!r} reads them from the file; "
        "set one of them only",
    ),
    Relation(
        ("data.rating_events", "data.event_types"),
        lambda ratings, names: not ratings or names is None,
        "{k0}=true names its own event types; leave {k1}=null",
    ),
    Rule("data.time_window.start", Int(optional=True, example=1_600_000_000)),
    Rule("data.time_window.end", Int(optional=True, example=1_700_000_000)),
    Relation(
        ("data.time_window.start", "data.time_window.end"),
        lambda start, end: start is None or end is None or start < end,
        "data.time_window: start={v0} must be before end={v1}",
    ),
    Rule("data.filter.min_user", Int(0, example=5)),
    Rule("data.filter.min_item", Int(0, example=5)),
    Rule("data.filter.iterative", Bool()),
    Rule("data.split.min_events", Int(0, example=3)),
    Rule("data.split.valid_time", Int(optional=True, example=1_650_000_000)),
    Rule("data.split.test_time", Int(optional=True, example=1_660_000_000)),
    Relation(
        ("data.split.valid_time", "data.split.test_time"),
        lambda valid, test: valid is None or test is None or valid <= test,
        "data config: split.valid_time={v0} is after split.test_time={v1}",
    ),
    _known_keys("ctr", CTR_DEFAULTS),
    Rule("data.ctr.rating_threshold", Num(example=4.0), present_only=True),
    Rule("data.ctr.positive_events", Names(), present_only=True),
    Rule("data.ctr.negatives", Int(0, 10_000, example=1), present_only=True),
    Rule("data.ctr.seed", Seed(), present_only=True),
    _known_keys("synthetic", SYNTHETIC),
    Rule("data.synthetic.seed", Seed(), present_only=True),
    [Rule(f"data.synthetic.{name}", Int(1, 10**9), present_only=True) for name in _SYNTHETIC_INTS],
    Rule("data.synthetic.max_events", Int(1, 10**6), present_only=True),
    Relation(
        ("data.synthetic.max_events", "data.synthetic.min_events"),
        lambda most, least: most >= least,
        "{k0}={v0} must be an integer >= {k1}={v1}",
        present_only=True,
    ),
    Rule("data.synthetic.start_time", Int(0, 2**40), present_only=True),
    Rule("data.synthetic.mean_events", Num(above=0, maximum=10**6), present_only=True),
    Rule("data.synthetic.taste_concentration", Num(above=0), present_only=True),
    [
        Rule(f"data.synthetic.{name}", Num(minimum=0, maximum=1), present_only=True)
        for name in _SYNTHETIC_SHARES
    ],
    Relation(
        ("data.synthetic.p_current_interest", "data.synthetic.p_other_tastes"),
        lambda current, other: current + other <= 1,
        "data.synthetic.p_current_interest + p_other_tastes = {v0} + {v1} must be <= 1 (they are shares of "
        "the impressions)",
        present_only=True,
    ),
    [
        Rule(f"data.synthetic.{name}", Num(minimum=-1e3, maximum=1e3), present_only=True)
        for name in _SYNTHETIC_WEIGHTS
    ],
    Rule("data.item_attributes", AttributesPath()),
)


def check_values(spec: dict[str, Any]) -> None:
    """`DATA` on a normalized spec."""
    params = spec["synthetic"]
    merged = {**SYNTHETIC, **params} if isinstance(params, dict) else params
    DATA.validate({"data": {**spec, "synthetic": merged}})


def check_source(spec: dict[str, Any]) -> None:
    """The input files of a normalized spec exist (synthetic data has no event file), checked before
    any work."""
    if spec["format"] != "synthetic":
        path = Path(spec["path"]).expanduser()
        if not path.is_file():
            kind = "is a folder, not a file" if path.is_dir() else "no such file"
            raise RecsysError(
                f"data.path={path}: {kind}; set data.path=/path/to/file (or paths.shared_data_dir=...)"
            )
    extra = attributes.source(spec)
    if extra is not None:
        attributes.check_file(extra)


def config_hash(spec: dict[str, Any], known: Iterable[dict[str, Any]] = ()) -> str:
    """Short, stable hash of a normalized data config (and the output format version), from content:
    each source file (data.path, data.item_attributes) counts by its sha256, never by where it lies,
    so the same files prepared on another machine or under another folder hash the same (and a
    checkpoint's `data_config_hash` matches there). `known`: source fingerprints already taken
    ({path, bytes, mtime_ns, sha256}, e.g. the manifests' `sources`), reused while the file's size and
    mtime are unchanged, so a cache hit does not read the log again.

    Keys added later are left out while they hold their off value, so adding one does not change the
    hash of a config that does not use it."""
    content = {k: v for k, v in spec.items() if not (k in _ADDED_KEYS and v is None)}
    for key in SOURCE_KEYS:
        if content.get(key) not in (None, ""):
            content[key] = {"sha256": source_sha256(Path(content[key]).expanduser(), known)}
    return content_hash(content)
