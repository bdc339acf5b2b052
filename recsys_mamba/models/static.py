"""An encoder without a sequence: every hidden state is zero, so a head on top knows only what it
embeds itself (the candidate item, and the user where the head has user embeddings). With
`CTRHead(n_users=...)` that is the DNN on user and item embeddings every CTR paper reports: the
baseline that shows what the sequence adds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from recsys_mamba.models.base import SequenceEncoder, State


class StaticEncoder(SequenceEncoder):
    uses_sequence = False

    def __init__(self, n_items: int, **common: Any) -> None:
        """`common`: the arguments every encoder takes (`SequenceEncoder`); only the item (and side
        feature) embeddings are used, by the head."""
        super().__init__(n_items, **common)

    def forward(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        self.check_inputs(items, categories, event_types)
        return self.item_emb.weight.new_zeros(*items.shape, self.d_model)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Nothing to remember: a (batch, 0) placeholder, so states still split and merge per user."""
        device = device or self.item_emb.weight.device
        return {"none": torch.zeros(batch_size, 0, device=device, dtype=dtype or self.item_emb.weight.dtype)}

    def step(
        self, items: Tensor, state: State, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> tuple[Tensor, State]:
        self.check_step_inputs(items, categories, event_types)
        return self.item_emb.weight.new_zeros(items.shape[0], self.d_model), state
