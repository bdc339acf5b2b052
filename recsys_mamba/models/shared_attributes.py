"""Which items share an attribute (a brand, a category) with which: a sparse item-to-item table that a
next-item head adds, with one learned weight, beside the transition counts.

The encoder already adds the mean of an item's attribute embeddings to its vector, but a 64-wide
vector tells hundreds of brands apart only approximately; the table says exactly that a candidate is
of the item just seen's brand. Nothing in it is counted from events, so unlike the transition counts
it needs no leave-one-out and holds nothing of a training target. Attributes held by many items (a
top-level category) are left out: they say little about the next item, and the pairs of an attribute
grow with the square of its items.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.transitions import TransitionTable


def check_max_items(max_items: object) -> int:
    """max_items as given, refused unless an integer >= 2 (a pair needs two items)."""
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 2:
        raise RecsysError(
            f"attribute_max_items must be an integer >= 2 (a pair needs two items), got {max_items!r}"
        )
    return max_items


def shared_attribute_pairs(item_attributes: np.ndarray, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (a, b), a != b, of items that share an attribute held by at most max_items
    items, once per such attribute they share. item_attributes: (n_items + 1, K) attribute ids, 0 =
    padding (row 0 is the padding item)."""
    table = np.asarray(item_attributes)
    items = np.repeat(np.arange(table.shape[0]), table.shape[1])
    attributes = table.reshape(-1)
    real = (attributes > 0) & (items > 0)
    items, attributes = items[real], attributes[real]
    # an item listing one attribute twice holds it once
    pairs = np.unique(np.stack([attributes, items], 1), axis=0)
    attributes, items = pairs[:, 0], pairs[:, 1]
    sizes = np.bincount(attributes)
    kept = sizes[attributes] <= max_items
    attributes, items = attributes[kept], items[kept]  # sorted by attribute, then item
    starts = np.flatnonzero(np.r_[True, attributes[1:] != attributes[:-1]])
    sources, targets = [], []
    for group in np.split(items, starts[1:]):
        if len(group) > 1:
            a, b = np.meshgrid(group, group, indexing="ij")
            other = a != b
            sources.append(a[other])
            targets.append(b[other])
    if not sources:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(sources), np.concatenate(targets)


def shared_attribute_table(item_attributes: Tensor | np.ndarray, max_items: int) -> TransitionTable:
    """The items sharing attributes with each item, valued log(1 + attributes shared): a
    `TransitionTable` read as one ("successors" are the items sharing an attribute). Not saved with
    the weights: it is rebuilt from the encoder's attribute table, which is."""
    on = item_attributes.device if isinstance(item_attributes, Tensor) else None
    table = item_attributes.cpu().numpy() if on is not None else np.asarray(item_attributes)
    sources, targets = shared_attribute_pairs(table, check_max_items(max_items))
    shared = TransitionTable(table.shape[0] - 1, sources, targets, persistent=False)
    return shared if on is None else shared.to(on)


__all__ = ["check_max_items", "shared_attribute_pairs", "shared_attribute_table"]
