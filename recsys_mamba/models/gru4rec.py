"""GRU4Rec: a GRU over the event sequence (Hidasi et al., 2016), the recurrent baseline.

Its streaming state is the GRU hidden state of every layer, a fixed size like Mamba's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from recsys_mamba.models.base import Dropout, SequenceEncoder, State, select


class GRU4RecEncoder(SequenceEncoder):
    def __init__(self, n_items: int, n_layers: int = 1, **common: Any) -> None:
        """`common`: the arguments every encoder takes (`SequenceEncoder`); max_len and
        gradient_checkpointing are accepted for that shared contract and unused."""
        super().__init__(n_items, n_layers=n_layers, **common)
        d_model, dropout = self.d_model, self.dropout_p
        self.emb_dropout = Dropout(dropout)
        self.gru = nn.GRU(
            d_model, d_model, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )

    def forward(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        mask = self.check_inputs(items, categories, event_types)
        h, _ = self.gru(self.emb_dropout(self.embed(items, categories, event_types)))
        return h * mask[..., None]

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Zeros: "h" (batch, n_layers, d_model)."""
        device = device or self.item_emb.weight.device
        dtype = dtype or self.item_emb.weight.dtype
        return {"h": torch.zeros(batch_size, self.n_layers, self.d_model, device=device, dtype=dtype)}

    def step(
        self, items: Tensor, state: State, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """One event per row -> (hidden (B, d_model), new state). Rows with item 0 keep their state."""
        real = self.check_step_inputs(items, categories, event_types)
        column = (slice(None), None)
        x = self.embed(items[column], select(categories, column), select(event_types, column))
        out, h = self.gru(x, state["h"].transpose(0, 1).contiguous())
        return out[:, 0] * real[:, None], {
            "h": torch.where(real[:, None, None], h.transpose(0, 1), state["h"])
        }
