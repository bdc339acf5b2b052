"""`RecModel`: an encoder and its task head, the unit that is built from a config, saved and loaded
(`runs`), trained (`training`) and scored (`tasks`, `scoring`)."""

from __future__ import annotations

from torch import nn

from recsys_mamba.models.base import SequenceEncoder


class RecModel(nn.Module):
    """Its state dict holds `encoder.*` and `head.*`, as a training checkpoint's does."""

    def __init__(self, encoder: SequenceEncoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
