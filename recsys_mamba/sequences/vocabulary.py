"""What a trained model needs of its data to score, and nothing more: the item table (original ids,
categories, training counts), event type names, vocabulary sizes and item attributes. A prepared
folder gives one (`PreparedData.vocabulary`); so does a checkpoint or a bundle, which carry theirs,
so scoring and serving never need the training data."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_mamba.errors import RecsysError


@dataclass(frozen=True)
class ItemTable:
    """Per item_idx (0 = padding): original id (str), category_idx and training interaction count."""

    ids: np.ndarray
    categories: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_frame(cls, items: pl.DataFrame, n_items: int) -> ItemTable:
        """From item_map.parquet's columns item_idx, item_id, category_idx, count."""
        idx = items["item_idx"].to_numpy()
        ids = np.full(n_items + 1, "", dtype=object)
        ids[idx] = items["item_id"].cast(pl.String).to_numpy()
        categories = np.zeros(n_items + 1, dtype=np.int64)
        categories[idx] = items["category_idx"].fill_null(0).to_numpy()
        counts = np.zeros(n_items + 1, dtype=np.float64)
        counts[idx] = items["count"].to_numpy()
        return cls(ids, categories, counts)

    @property
    def n_items(self) -> int:
        return len(self.ids) - 1

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Original id (as text) -> item_idx."""
        return {str(v): i for i, v in enumerate(self.ids) if i > 0}


@dataclass(frozen=True)
class Vocabulary:
    """`manifest` holds what checks and reports read of the data (name, config_hash); `folder` is
    None: there is no prepared folder behind it."""

    items: ItemTable
    event_type_names: list[str]
    n_categories: int
    item_attributes: np.ndarray | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "n_items": self.items.n_items,
            "n_categories": int(self.n_categories),
            "n_event_types": len(self.event_type_names),
        }

    def encoder_inputs(self) -> dict[str, Any]:
        """What an encoder's constructor takes of the data (as `PreparedData.encoder_inputs`)."""
        if self.item_attributes is None:
            return dict(self.sizes)
        return {**self.sizes, "item_attributes": torch.from_numpy(self.item_attributes)}

    # ---- as carried in a checkpoint ---------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        """Plain lists and tensors (what a weights-only checkpoint may hold); attributes travel in the
        encoder's weights."""
        return {
            "item_ids": [str(v) for v in self.items.ids[1:]],
            "categories": torch.from_numpy(np.ascontiguousarray(self.items.categories, dtype=np.int64)),
            "counts": torch.from_numpy(np.ascontiguousarray(self.items.counts, dtype=np.float64)),
            "event_types": list(self.event_type_names),
            "n_categories": int(self.n_categories),
        }

    @classmethod
    def from_payload(
        cls,
        payload: Any,
        source: str | Path,
        item_attributes: np.ndarray | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> Vocabulary:
        try:
            ids = np.array(["", *(str(v) for v in payload["item_ids"])], dtype=object)
            categories = payload["categories"].numpy().astype(np.int64)
            counts = payload["counts"].numpy().astype(np.float64)
            names = [str(n) for n in payload["event_types"]]
            n_categories = int(payload["n_categories"])
        except (KeyError, TypeError, AttributeError) as err:
            raise RecsysError(
                f"{source}: its item table is incomplete ({err!r}): the file is damaged or was tampered "
                "with; export it again from the checkpoint, or retrain"
            ) from None
        if not len(ids) == len(categories) == len(counts):
            raise RecsysError(
                f"{source}: its item table has {len(ids) - 1} ids but {len(categories) - 1} categories and "
                f"{len(counts) - 1} counts; the file is damaged: export it again"
            )
        items = ItemTable(ids, categories, counts)
        return cls(items, names, n_categories, item_attributes, dict(manifest or {}))


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of a vocabulary payload: catches an item table changed after saving."""
    text = json.dumps([payload["item_ids"], payload["event_types"], payload["n_categories"]])
    sha = hashlib.sha256(text.encode())
    for key in ("categories", "counts"):
        sha.update(payload[key].contiguous().numpy().tobytes())
    return sha.hexdigest()
