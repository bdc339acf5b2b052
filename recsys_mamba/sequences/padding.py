"""Right padding and last positions: how variable-length histories become (B, L) tensors and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import torch
from torch import Tensor


def pad_right(lists: pl.Series | Sequence[Sequence[int]], width: int) -> Tensor:
    """Right-padded (B, width) LongTensor of the last `width` entries of each list (0 = padding)."""
    rows = lists.to_list() if isinstance(lists, pl.Series) else lists
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        tail = np.asarray(row[-width:] if width else [], dtype=np.int64)
        out[i, : len(tail)] = tail
    return torch.from_numpy(out)


def last_positions(lengths: Tensor) -> Tensor:
    """Index of each row's last real event; a row without events gets position 0."""
    return (lengths.long() - 1).clamp(min=0)


def gather_last(hidden: Tensor, lengths: Tensor) -> Tensor:
    """hidden (B, L, d) at each row's last real position -> (B, d)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_positions(lengths).to(hidden.device)]
