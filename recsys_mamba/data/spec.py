"""The data config: defaults, checks and the hash that keys the cache."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_mamba.data.format import FORMAT_VERSION
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
    "on_null": "error",
    "duplicates": "keep",
    "time_window": {"start": None, "end": None},
    "filter": {"min_user": 0, "min_item": 0, "iterative": True},
    "split": {"kind": "loo", "anchor": "all", "min_events": 3, "valid_time": None, "test_time": None},
    "ctr": None,
    "engine": "streaming",
    "synthetic": None,
}

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
        spec["ctr"] = _merge(CTR_DEFAULTS, spec["ctr"])
        if spec["ctr"]["label_from"] not in ("rating", "event_type", "label", "none"):
            raise RecsysError(
                f"data config: ctr.label_from={spec['ctr']['label_from']!r} is not one of "
                "['rating', 'event_type', 'label', 'none']"
            )
    return spec


def config_hash(spec: dict[str, Any]) -> str:
    """Short, stable hash of a normalized data config (and the output format version)."""
    text = json.dumps({"format_version": FORMAT_VERSION, "data": spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
