"""Stream mode: events in time order update each user's encoder state with one `step` each."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_atomic
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.runs.inference import fresh_state, state_hidden, step_states
from recsys_mamba.scoring.parts import RERUN_HINT


class StateStore:
    """Per-user encoder state (plus last hidden output) and seen items; saved as Parquet of bytes."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        self.encoder = encoder
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.seen: dict[str, list[int]] = {}

    def update(self, users: list[str], items: torch.Tensor, cats: torch.Tensor, types: torch.Tensor) -> None:
        """One event for each of `users` (all distinct)."""
        states = [self.states.get(u) or fresh_state(self.encoder) for u in users]
        new = step_states(self.encoder, states, items, cats, types)
        for user, state, item in zip(users, new, items.tolist(), strict=True):
            self.states[user] = state
            self.seen.setdefault(user, []).append(item)

    def consume(self, events: pl.DataFrame, chunk_events: int, progress: bool) -> None:
        """Apply `events` (model space, any order) in time order; a user's events stay in sequence."""
        events = events.sort("timestamp", maintain_order=True)
        for start in tqdm(range(0, len(events), chunk_events), desc="stream", disable=not progress):
            chunk = events.slice(start, chunk_events).with_columns(
                pl.int_range(pl.len()).over("user_id").alias("round")
            )
            # Within a chunk, a user's k-th event goes in round k, so one step batch holds a user once.
            for _, part in chunk.group_by("round", maintain_order=True):
                self.update(
                    part["user_id"].to_list(),
                    *(
                        torch.from_numpy(part[c].to_numpy().astype("int64"))
                        for c in ("item_idx", "category_idx", "event_type_idx")
                    ),
                )

    def table(self) -> pl.DataFrame:
        """user_id, items (seen, model space) and hidden (last output): the input of ranking."""
        users = sorted(self.states)
        return pl.DataFrame(
            {"user_id": users, "items": [self.seen[u] for u in users]},
            schema={"user_id": pl.String, "items": pl.List(pl.Int64)},
        )

    def hidden(self, users: list[str]) -> torch.Tensor:
        return state_hidden([self.states[u] for u in users])

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
