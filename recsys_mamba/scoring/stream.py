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
    state's last output) and seen. A loaded file's states stay in the file until their user's next
    event, and ranking such a user reads the stored last output alone: scoring from stored states never
    reads or deserialises a state it does not advance (saving copies their bytes file to file)."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        super().__init__(encoder)
        self.stored: set[str] = set()  # users whose state is in `source`, not advanced since
        self.stored_hidden: dict[str, Tensor] = {}
        self.source: Path | None = None

    def __len__(self) -> int:
        return len(self.states) + len(self.stored)

    def _stored_blobs(self, users: list[str]) -> pl.DataFrame:
        """user_id and state (bytes) of `users` from the loaded file, read for these rows only."""
        assert self.source is not None
        wanted = pl.Series(users, dtype=pl.String).implode()
        return (
            pl.scan_parquet(self.source)
            .select("user_id", "state")
            .filter(pl.col("user_id").is_in(wanted))
            .collect()
        )

    def _advance(self, users: list[str]) -> None:
        kept = [u for u in users if u in self.stored]
        if kept:
            for user, blob in self._stored_blobs(kept).iter_rows():
                self.states[user] = self.encoder.load_state(blob)
                self.stored.discard(user)
                self.stored_hidden.pop(user, None)

    def update(self, users: list[str], items: Tensor, cats: Tensor, types: Tensor) -> None:
        self._advance(users)
        super().update(users, items, cats, types)

    def consume(self, events: pl.DataFrame, chunk_events: int, progress: bool) -> None:  # type: ignore[override]
        super().consume(events, chunk_events, lambda it: tqdm(it, desc="stream", disable=not progress))

    def table(self, users: list[str] | None = None) -> pl.DataFrame:
        return super().table(sorted(set(self.states) | self.stored) if users is None else users)

    def hidden(self, users: list[str]) -> Tensor:
        kept = [u for u in users if u in self.stored]
        if not kept:
            return super().hidden(users)
        missing = [u for u in kept if u not in self.stored_hidden]  # a file of an earlier version
        if missing:
            blobs = self._stored_blobs(missing).iter_rows()
            self.stored_hidden.update({u: self.encoder.load_state(b)[HIDDEN] for u, b in blobs})
        live = [u for u in users if u not in self.stored]
        rows = dict(zip(live, super().hidden(live), strict=True)) if live else {}
        out = [self.stored_hidden[u].reshape(-1) if u in self.stored else rows[u] for u in users]
        return torch.stack(out)

    def save(self, path: Path) -> None:
        d = self.encoder.d_model
        live = sorted(self.states)
        kept = self._stored_blobs(sorted(self.stored)) if self.stored else None
        users = live + ([] if kept is None else kept["user_id"].to_list())
        blobs = pl.Series("state", [self.encoder.save_state(self.states[u]) for u in live], dtype=pl.Binary)
        if kept is not None:
            blobs = pl.concat([blobs, kept["state"]])
        hidden = self.hidden(users).float().numpy() if users else np.zeros((0, d), dtype="float32")
        frame = pl.DataFrame(
            {"user_id": users, "state": blobs, "hidden": hidden, "seen": [self.seen[u] for u in users]},
            schema={
                "user_id": pl.String,
                "state": pl.Binary,
                "hidden": pl.Array(pl.Float32, d),
                "seen": pl.List(pl.Int64),
            },
        ).sort("user_id")
        write_atomic(path, frame.write_parquet, hint=RERUN_HINT)

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise RecsysError(f"state_in={path} does not exist; pass a state file written by mode=stream")
        has_hidden = "hidden" in pl.read_parquet_schema(path)
        frame = pl.read_parquet(path, columns=["user_id", "seen", *(["hidden"] if has_hidden else [])])
        users = frame["user_id"].to_list()
        self.source = path
        self.stored.update(users)
        self.seen.update(zip(users, (list(s) for s in frame["seen"].to_list()), strict=True))
        if has_hidden:
            hidden = torch.from_numpy(np.array(frame["hidden"].to_numpy(), dtype=np.float32))  # writable
            self.stored_hidden.update(zip(users, hidden.unbind(0), strict=True))
