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


def _names(value: Any, key: str) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecsysError(f"{key}={value!r} must be null or a list of names, e.g. {key}=[pv,cart,buy]")
    if len(set(value)) != len(value):
        raise RecsysError(f"{key}={value!r} names a type twice; list each once")


def _check_separator(spec: dict[str, Any]) -> None:
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


def _check_synthetic(params: Any) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise RecsysError(f"data.synthetic={params!r} must be a mapping of generator settings")
    unknown = sorted(set(params) - set(SYNTHETIC))
    if unknown:
        raise RecsysError(f"data.synthetic: unknown keys {unknown}; known keys are {sorted(SYNTHETIC)}")
    p = {**SYNTHETIC, **params}
    key = "data.synthetic."
    checks.seed(p["seed"], key + "seed")
    for name in ("n_users", "n_items", "n_categories", "min_events", "days"):
        checks.integer(p[name], key + name, minimum=1, maximum=10**9)
    checks.integer(p["max_events"], key + "max_events", minimum=p["min_events"], maximum=10**6)
    checks.integer(p["start_time"], key + "start_time", minimum=0, maximum=2**40)
    checks.number(p["mean_events"], key + "mean_events", above=0, maximum=10**6)
    checks.number(p["taste_concentration"], key + "taste_concentration", above=0)
    for name in ("drift", "session_drift", "session_break", "p_current_interest", "p_other_tastes"):
        checks.number(p[name], key + name, minimum=0, maximum=1)
    if p["p_current_interest"] + p["p_other_tastes"] > 1:
        raise RecsysError(
            f"{key}p_current_interest + p_other_tastes = {p['p_current_interest'] + p['p_other_tastes']} "
            "must be <= 1 (they are shares of the impressions)"
        )
    for name in ("pop_exponent", "ctr_bias", "interest_weight", "recent_weight", "quality_weight"):
        checks.number(p[name], key + name, minimum=-1e3, maximum=1e3)


def check_values(spec: dict[str, Any]) -> None:
    """Types and ranges of every value, so a bad override fails before any file is read."""
    name = checks.text(spec["name"], "data.name", example="mydata")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise RecsysError(f"data.name={name!r} names the cache folder: no '/' or '\\', e.g. data.name=mydata")
    if spec["format"] != "synthetic":
        checks.path(spec["path"], "data.path")
    _check_separator(spec)
    checks.boolean(spec["has_header"], "data.has_header")
    columns = spec["columns"]
    if not isinstance(columns, dict):
        raise RecsysError(f"data.columns={columns!r} must map fields to column names")
    unknown = sorted(set(columns) - set(DEFAULTS["columns"]))
    if unknown:
        known = list(DEFAULTS["columns"])
        raise RecsysError(f"data.columns: unknown fields {unknown}; known fields are {known}")
    for field, column in columns.items():
        checks.text(column, f"data.columns.{field}", optional=field in OPTIONAL_COLUMNS, example=field)
    _names(spec["event_types"], "data.event_types")
    if checks.boolean(spec["rating_events"], "data.rating_events"):
        if spec["columns"].get("event_type") is not None:
            raise RecsysError(
                "data.rating_events=true makes the event types from the ratings, but "
                f"data.columns.event_type={spec['columns']['event_type']!r} reads them from the file; "
                "set one of them only"
            )
        if spec["event_types"] is not None:
            raise RecsysError(
                "data.rating_events=true names its own event types; leave data.event_types=null"
            )
    window = spec["time_window"]
    start = checks.integer(window["start"], "data.time_window.start", optional=True, example=1_600_000_000)
    end = checks.integer(window["end"], "data.time_window.end", optional=True, example=1_700_000_000)
    if start is not None and end is not None and start >= end:
        raise RecsysError(f"data.time_window: start={start} must be before end={end}")
    flt = spec["filter"]
    checks.integer(flt["min_user"], "data.filter.min_user", minimum=0, example=5)
    checks.integer(flt["min_item"], "data.filter.min_item", minimum=0, example=5)
    checks.boolean(flt["iterative"], "data.filter.iterative")
    split = spec["split"]
    checks.integer(split["min_events"], "data.split.min_events", minimum=0, example=3)
    valid = checks.integer(split["valid_time"], "data.split.valid_time", optional=True, example=1_650_000_000)
    test = checks.integer(split["test_time"], "data.split.test_time", optional=True, example=1_660_000_000)
    if valid is not None and test is not None and valid > test:
        raise RecsysError(f"data config: split.valid_time={valid} is after split.test_time={test}")
    ctr = spec["ctr"]
    if ctr is not None:
        unknown = sorted(set(ctr) - set(CTR_DEFAULTS))
        if unknown:
            raise RecsysError(f"data.ctr: unknown keys {unknown}; known keys are {sorted(CTR_DEFAULTS)}")
        checks.number(ctr["rating_threshold"], "data.ctr.rating_threshold", example=4.0)
        _names(ctr["positive_events"], "data.ctr.positive_events")
        checks.integer(ctr["negatives"], "data.ctr.negatives", minimum=0, maximum=10_000, example=1)
        checks.seed(ctr["seed"], "data.ctr.seed")
    _check_synthetic(spec["synthetic"])
    _check_item_attributes(spec["item_attributes"])


def _check_item_attributes(value: Any) -> None:
    key, suffixes = attributes.KEY, attributes.SUFFIXES
    path = checks.path(value, key, optional=True)
    if path is not None and path.suffix.lower() not in suffixes:
        raise RecsysError(
            f"{key}={value!r}: the file's suffix names its format and must be one of {list(suffixes)} "
            '(.json: {"<item id>": [attribute, ...]}; .csv/.tsv/.parquet: columns item_id, attribute)'
        )


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
