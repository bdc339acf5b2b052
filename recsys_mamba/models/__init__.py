"""Sequence encoders (one per file) behind one contract, plus next-click and CTR heads."""

from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.models.gru4rec import GRU4RecEncoder
from recsys_mamba.models.heads import CTRHead, NextItemHead
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.models.registry import ENCODERS, build_encoder
from recsys_mamba.models.sasrec import SASRecEncoder

__all__ = [
    "ENCODERS",
    "CTRHead",
    "GRU4RecEncoder",
    "MambaEncoder",
    "NextItemHead",
    "SASRecEncoder",
    "SequenceEncoder",
    "build_encoder",
]
