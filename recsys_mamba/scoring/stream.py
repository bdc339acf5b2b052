"""Stream mode: events in time order update each user's encoder state with one `step` each."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from tqdm import tqdm

from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_atomic
from recsys_mamba.runs.inference import StreamStates
from recsys_mamba.scoring.parts import RERUN_HINT


class StateStore(StreamStates):
    """`runs.inference.StreamStates` saved as Parquet of bytes (user_id, state, seen)."""

    def consume(self, events: pl.DataFrame, chunk_events: int, progress: bool) -> None:  # type: ignore[override]
        super().consume(events, chunk_events, lambda it: tqdm(it, desc="stream", disable=not progress))

    def save(self, path: Path) -> None:
        users = sorted(self.states)
        frame = pl.DataFrame(
            {
                "user_id": users,
                "state": [self.encoder.save_state(self.states[u]) for u in users],
                "seen": [self.seen[u] for u in users],
            },
            schema={"user_id": pl.String, "state": pl.Binary, "seen": pl.List(pl.Int64)},
        )
        write_atomic(path, frame.write_parquet, hint=RERUN_HINT)

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise RecsysError(f"state_in={path} does not exist; pass a state file written by mode=stream")
        frame = pl.read_parquet(path)
        for user, blob, seen in frame.iter_rows():
            self.states[user] = self.encoder.load_state(blob)
            self.seen[user] = list(seen)
