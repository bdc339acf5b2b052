"""Sequence encoders (one per file) behind one contract, plus next-click and CTR heads: plain
`nn.Module`s over tensors that never read files or know Lightning."""

from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.models.gru4rec import GRU4RecEncoder
from recsys_mamba.models.heads import CTRHead, NextItemHead
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.models.model import RecModel
from recsys_mamba.models.sasrec import SASRecEncoder
from recsys_mamba.models.static import StaticEncoder

__all__ = [
    "CTRHead",
    "GRU4RecEncoder",
    "MambaEncoder",
    "NextItemHead",
    "RecModel",
    "SASRecEncoder",
    "SequenceEncoder",
    "StaticEncoder",
]
