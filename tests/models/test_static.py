"""The sequence-free encoder behind model=dnn: hidden states carry nothing of the events."""

from __future__ import annotations

import torch

from recsys_mamba.models import StaticEncoder
from tests.models.conftest import random_batch


def test_hidden_states_ignore_the_events_and_the_state_is_empty() -> None:
    encoder = StaticEncoder(n_items=30, d_model=16, n_layers=1, n_categories=5, n_event_types=3, max_len=64)
    assert not encoder.uses_sequence
    items, cats, events = random_batch(lengths=(12, 7, 3, 0))
    hidden = encoder(items, cats, events)
    assert hidden.shape == (*items.shape, 16) and not hidden.any()
    state = encoder.init_state(4)
    out, state = encoder.step(items[:, 0], state, cats[:, 0], events[:, 0])
    assert out.shape == (4, 16) and not out.any() and state["none"].shape == (4, 0)
    # Its item embeddings are what a head on top learns from: they are trainable.
    assert encoder.item_emb.weight.requires_grad and isinstance(encoder.item_emb.weight, torch.nn.Parameter)
