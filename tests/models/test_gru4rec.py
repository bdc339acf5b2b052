"""GRU4Rec-specific behaviour: parameter count and its fixed-size state."""

from __future__ import annotations

import torch

from recsys_mamba.models import GRU4RecEncoder
from tests.models.conftest import make_encoder


def test_parameter_count() -> None:
    d = 64
    model = GRU4RecEncoder(n_items=1682, d_model=d, n_layers=1)
    assert sum(p.numel() for p in model.parameters()) == 1683 * d + 3 * (2 * d * d + 2 * d)


def test_state_has_a_fixed_size() -> None:
    model = make_encoder("gru4rec")
    state = model.init_state(1)
    first = len(model.save_state(state))
    for _ in range(20):
        _, state = model.step(torch.tensor([3]), state)
    assert len(model.save_state(state)) == first
