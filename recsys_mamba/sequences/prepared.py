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
from recsys_mamba.sequences.vocabulary import ItemTable, Vocabulary


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

    def vocabulary(self) -> Vocabulary:
        """What a model trained on this folder needs of it to score (no sequences)."""
        manifest = {k: self.manifest.get(k) for k in ("name", "config_hash")}
        return Vocabulary(
            self.items, self.event_type_names, self.sizes["n_categories"], self.item_attributes, manifest,
            self.folder,
        )

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
