"""A prepared folder (`recsys_mamba.data.format`) as the model side reads it: vocabulary sizes, the item
table, item attributes and every user's sequence."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_mamba.data.format import (
    CTR,
    ITEM_MAP,
    USER_MAP,
    load_item_attributes,
    load_manifest,
)
from recsys_mamba.errors import RecsysError
from recsys_mamba.sequences.mapped import open_store
from recsys_mamba.sequences.store import SequenceStore


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
class PreparedData:
    """Reads lazily: opening a folder reads only its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: Path | str) -> PreparedData:
        folder = Path(folder)
        return cls(folder, dict(load_manifest(folder)))

    def read(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        path = self.folder / name
        if not path.is_file():
            raise RecsysError(
                f"{path} is missing from the prepared data; re-run python -m recsys_mamba.prepare with "
                "overwrite=true (or delete the cache folder) so it is rebuilt"
            )
        return pl.read_parquet(path, columns=columns)

    @property
    def sizes(self) -> dict[str, int]:
        """Vocabulary sizes for an encoder."""
        return {
            "n_items": int(self.manifest["n_items"]),
            "n_categories": int(self.manifest.get("n_categories") or 0),
            "n_event_types": int(self.manifest.get("n_event_types") or 0),
        }

    @property
    def event_type_names(self) -> list[str]:
        return [str(n) for n in self.manifest.get("event_types") or []]

    @functools.cached_property
    def store(self) -> SequenceStore:
        """Every user's sequence as memory-mapped flat arrays (`sequences.mapped`), built on first use."""
        return open_store(self.folder)

    @functools.cached_property
    def items(self) -> ItemTable:
        items = self.read(ITEM_MAP, columns=["item_idx", "item_id", "category_idx", "count"])
        return ItemTable.from_frame(items, int(self.manifest["n_items"]))

    @functools.cached_property
    def item_attributes(self) -> np.ndarray | None:
        """(n_items + 1, K) attribute ids per item, or None without attributes."""
        return load_item_attributes(self.folder)

    def encoder_inputs(self) -> dict[str, Any]:
        """What the data gives an encoder's constructor: `sizes`, and the item attribute table if any."""
        if self.item_attributes is None:
            return dict(self.sizes)
        return {**self.sizes, "item_attributes": torch.from_numpy(self.item_attributes)}

    def ctr_samples(self) -> pl.DataFrame:
        if not self.manifest.get("ctr"):
            raise RecsysError(
                f"task=ctr needs CTR samples but the prepared data at {self.folder} has none; "
                "pick a data config with CTR enabled (e.g. data=synthetic or data=ml1m_ctr) "
                "or task=next_item"
            )
        return self.read(CTR)

    def user_ids(self) -> pl.DataFrame:
        """user_idx -> original user_id (str)."""
        return self.read(USER_MAP)

    def user_index(self, user_ids: pl.Series) -> np.ndarray:
        """The user_idx of each original id (as text), 0 where the prepared data does not know it."""
        known = self.user_ids().select(pl.col("user_id").cast(pl.String), "user_idx")
        found = pl.DataFrame({"user_id": user_ids.cast(pl.String)}).join(
            known, on="user_id", how="left", maintain_order="left"
        )
        return found["user_idx"].fill_null(0).to_numpy().astype(np.int64)
