"""Stream mode: events in time order update each user's encoder state with one `step` each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor
from tqdm import tqdm

from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_atomic
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.runs.inference import HIDDEN, StreamStates
from recsys_mamba.scoring.parts import RERUN_HINT


class StateStore(StreamStates):
    """`runs.inference.StreamStates` saved as Parquet: user_id, state (`save_state` bytes), hidden (the
    state's last output) and seen. A loaded state stays bytes until its user's next event, and ranking
    such a user reads the stored last output alone: scoring from stored states never deserialises a
    state it does not advance."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        super().__init__(encoder)
        self.stored: dict[str, bytes] = {}  # loaded, not advanced since
        self.stored_hidden: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.states) + len(self.stored)

    def _advance(self, users: list[str]) -> None:
        for user in users:
            if user in self.stored:
                self.states[user] = self.encoder.load_state(self.stored.pop(user))
                self.stored_hidden.pop(user, None)

    def update(self, users: list[str], items: Tensor, cats: Tensor, types: Tensor) -> None:
        self._advance(users)
        super().update(users, items, cats, types)

    def consume(self, events: pl.DataFrame, chunk_events: int, progress: bool) -> None:  # type: ignore[override]
        super().consume(events, chunk_events, lambda it: tqdm(it, desc="stream", disable=not progress))

    def table(self, users: list[str] | None = None) -> pl.DataFrame:
        return super().table(sorted(set(self.states) | set(self.stored)) if users is None else users)

    def hidden(self, users: list[str]) -> Tensor:
        kept = [u for u in users if u in self.stored]
        if not kept:
            return super().hidden(users)
        missing = [u for u in kept if u not in self.stored_hidden]  # a file of an earlier version
        self.stored_hidden.update({u: self.encoder.load_state(self.stored[u])[HIDDEN] for u in missing})
        live = [u for u in users if u not in self.stored]
        rows = dict(zip(live, super().hidden(live), strict=True)) if live else {}
        out = [self.stored_hidden[u].reshape(-1) if u in self.stored else rows[u] for u in users]
        return torch.stack(out)

    def save(self, path: Path) -> None:
        users = sorted(set(self.states) | set(self.stored))
        blobs = [self.stored.get(u) or self.encoder.save_state(self.states[u]) for u in users]
        d = self.encoder.d_model
        hidden = self.hidden(users).float().numpy() if users else np.zeros((0, d), dtype="float32")
        frame = pl.DataFrame(
            {
                "user_id": users,
                "state": blobs,
                "hidden": hidden,
                "seen": [self.seen[u] for u in users],
            },
            schema={
                "user_id": pl.String,
                "state": pl.Binary,
                "hidden": pl.Array(pl.Float32, d),
                "seen": pl.List(pl.Int64),
            },
        )
        write_atomic(path, frame.write_parquet, hint=RERUN_HINT)

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise RecsysError(f"state_in={path} does not exist; pass a state file written by mode=stream")
        frame = pl.read_parquet(path)
        users = frame["user_id"].to_list()
        self.stored.update(zip(users, frame["state"].to_list(), strict=True))
        self.seen.update(zip(users, (list(s) for s in frame["seen"].to_list()), strict=True))
        if "hidden" in frame.columns:
            hidden = torch.from_numpy(np.array(frame["hidden"].to_numpy(), dtype=np.float32))  # writable
            self.stored_hidden.update(zip(users, hidden.unbind(0), strict=True))
