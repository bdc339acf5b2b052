"""Encoders by name, as configs pick them (`model=mamba`, `model=sasrec`, `model=gru4rec`)."""

from __future__ import annotations

from typing import Any

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.models.gru4rec import GRU4RecEncoder
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.models.sasrec import SASRecEncoder

ENCODERS: dict[str, type[SequenceEncoder]] = {
    "mamba": MambaEncoder,
    "sasrec": SASRecEncoder,
    "gru4rec": GRU4RecEncoder,
}


def build_encoder(name: str, **kwargs: Any) -> SequenceEncoder:
    """`ENCODERS[name](**kwargs)`, with a clear error for an unknown name."""
    if name not in ENCODERS:
        raise RecsysError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](**kwargs)
