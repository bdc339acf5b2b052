"""The Python API: load a trained model (a checkpoint or an exported bundle) and call it.

    from recsys_mamba import Recommender

    rec = Recommender.load("bundle/")                     # or "RUN/checkpoints/last.ckpt"
    top = rec.recommend(events, k=10, exclude_seen=True)  # user_id, item_id, score, rank, cold
    scores = rec.score(pairs, history=events)             # user_id, item_id, score, known_item, cold
    state = rec.new_state()                               # streaming: O(1) per event for Mamba
    state = rec.update(state, new_events)
    top = rec.recommend(state, k=10)

`events`: a polars or pandas frame with user_id, item_id[, timestamp, event_type]. Results are polars
frames with the original ids, of the type the input's id columns had. Every call goes through the
inference path of the scoring job (`runs.inference`), so it returns what `python -m recsys_mamba.score`
writes for the same input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.runs import Run, load_run
from recsys_mamba.runs.events import (
    EVENT_COLUMNS,
    as_ids,
    as_polars,
    event_frame,
    histories,
    id_type,
    output_type,
    pair_frame,
    to_model_space,
    unknown_items,
    with_id_types,
    with_users,
)
from recsys_mamba.runs.inference import StreamStates, candidate_chunk, topk_chunk, topk_from_states

CHUNK_USERS = 1024  # users scored at once: bounds memory to CHUNK_USERS x n_items scores
UNKNOWN_ITEMS = ("ignore", "reject")
TOPK_COLUMNS = ("user_id", "item_id", "score", "rank", "cold")


class UserStates(StreamStates):
    """Streaming state of any number of users (`Recommender.new_state`): each user's encoder state, the
    items they have had, how many events of unknown items were skipped, and the input's id types."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        super().__init__(encoder)
        self.unknown_items = 0
        self.id_types: dict[str, pl.DataType] = {}


class Recommender:
    """A trained model ready to call. `run` holds the model (eval mode, CPU), its config, task and
    vocabulary (item table, event type names). `unknown_items`: what an event or pair of an item the
    model does not know does: "ignore" (skipped, counted in `last_unknown_items` and a state's
    `unknown_items`) or "reject" (a RecsysError naming the items)."""

    def __init__(self, run: Run, unknown_items: str = "ignore") -> None:
        if unknown_items not in UNKNOWN_ITEMS:
            raise RecsysError(f"unknown_items={unknown_items!r} must be one of {list(UNKNOWN_ITEMS)}")
        self.run = run
        self.unknown_items = unknown_items
        self.last_unknown_items = 0  # events (or pairs) of unknown items in the last call

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        prepared: str | Path | None = None,
        max_len: int | None = None,
        unknown_items: str = "ignore",
    ) -> Recommender:
        """A bundle folder (python -m recsys_mamba.export) or a .ckpt of a train run; nothing else is
        needed. `prepared`: a prepared folder of the model's data (only to check it against); `max_len`:
        most recent events encoded per user in `recommend(events)` (default: the model's)."""
        return cls(load_run(path, prepared, max_len), unknown_items)

    # ---- what it is ------------------------------------------------------------------------------

    @property
    def task(self) -> str:
        return self.run.task.name

    @property
    def item_ids(self) -> list[str]:
        """Every item the model knows, by original id (item index i + 1 is item_ids[i])."""
        return [str(v) for v in self.run.vocabulary.items.ids[1:]]

    @property
    def max_len(self) -> int:
        return self.run.max_len

    def __repr__(self) -> str:
        encoder = type(self.run.model.encoder).__name__
        items = self.run.vocabulary.items.n_items
        return f"Recommender({encoder}, task={self.task}, items={items}, from {self.run.ckpt_path})"

    # ---- input -----------------------------------------------------------------------------------

    def _known(self, frame: pl.DataFrame, what: str) -> int:
        """Rows of `frame` whose item the model does not know; refused under unknown_items="reject"."""
        unknown = unknown_items(self.run.data, frame)
        if len(unknown) and self.unknown_items == "reject":
            raise RecsysError(
                f"{what}: {len(unknown)} item id(s) the model does not know in column 'item_id' (e.g. "
                f"{unknown.head(5).to_list()}); remove them, or load with unknown_items='ignore' to skip "
                "them"
            )
        count = int(frame["item_id"].is_in(unknown.implode()).sum()) if len(unknown) else 0
        self.last_unknown_items = count
        return count

    # ---- batch -----------------------------------------------------------------------------------

    def recommend(
        self, events: Any, k: int = 10, exclude_seen: bool = True, users: Any = None
    ) -> pl.DataFrame:
        """Top-`k` items per user after their `events` (a frame, or a state from `new_state`/`update`):
        rows user_id, item_id, score, rank (1 = best), cold (True: no known history, popularity list),
        sorted by user_id and rank. From events, each user's most recent `max_len` events are encoded,
        as `score mode=topk` does; from a state, every event fed so far counts, as `score mode=stream`
        does, for the state's users or those in `users` (a user without events gets the cold list)."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RecsysError(f"k={k!r} must be an integer >= 1, e.g. k=10")
        if isinstance(events, StreamStates):
            ids = None if users is None else as_ids(pl.DataFrame({"user_id": users}), "user_id", "users")
            table = events.table(None if ids is None else sorted(set(ids.to_list())))
            parts = [
                topk_from_states(self.run, events.hidden(c["user_id"].to_list()), c, k, exclude_seen)
                for c in _chunks(table)
            ]
            types = getattr(events, "id_types", {})
        else:
            if users is not None:
                raise RecsysError("recommend(events, users=...): users= selects users of a state only")
            frame, types = self._events(events)
            table, _ = histories(self.run.data, frame)
            parts = [topk_chunk(self.run, c, k, exclude_seen) for c in _chunks(table)]
        out = pl.concat(parts) if parts else _empty(TOPK_COLUMNS)
        return _original_ids(out.select(TOPK_COLUMNS), types)

    def score(self, pairs: Any, history: Any = None) -> pl.DataFrame:
        """Scores of (user_id, item_id) `pairs` after each user's `history` (events; None: no history,
        every user cold): the ranking score for next-item models, the click probability for CTR
        models, as `score mode=candidates` gives with `history=`. Rows user_id, item_id, score (null
        for an item the model does not know), known_item, cold; in the order of `pairs`."""
        frame = as_polars(pairs, "pairs")
        types = _id_types(frame)
        frame = pair_frame(frame, "pairs")
        if history is None:
            known = histories(self.run.data, event_frame(frame.head(0), "history"))[0]
        else:
            known = histories(self.run.data, event_frame(history, "history"))[0]
        self._known(frame, "pairs")
        table = with_users(known, frame["user_id"])
        parts = [
            candidate_chunk(self.run, c, frame.join(c.select("user_id"), on="user_id", how="semi"))
            for c in _chunks(table)
        ]
        out = pl.concat(parts) if parts else _empty(("user_id", "item_id", "score", "known_item", "cold"))
        # Back in the order of `pairs`: both hold the same (user_id, item_id) rows, so sorted they align.
        keys = ["user_id", "item_id"]
        order = frame.with_row_index("_row").sort(keys, maintain_order=True)["_row"]
        out = out.sort(keys, maintain_order=True).with_columns(order).sort("_row").drop("_row")
        return _original_ids(out, types)

    def _events(self, events: Any) -> tuple[pl.DataFrame, dict[str, pl.DataType]]:
        """`events` (a polars or pandas frame) checked and as text ids, and the input's id types;
        unknown items refused here under unknown_items="reject"."""
        frame = as_polars(events, "events")
        types = _id_types(frame)
        frame = event_frame(frame, "events")
        self._known(frame, "events")
        return frame, types

    # ---- streaming -------------------------------------------------------------------------------

    def new_state(self) -> UserStates:
        """An empty streaming state (any number of users) for `update` and `recommend`."""
        return UserStates(self.run.model.encoder)

    def update(self, state: UserStates, events: Any) -> UserStates:
        """Feed `events` into `state` in time order (the frame's order when it has no timestamp), each
        user's state advanced by the encoder's own `step` (O(1) per event for Mamba); events of items
        the model does not know are skipped and counted in `state.unknown_items` (or refused, with
        unknown_items="reject"). An update that fails (SASRec: a history past its max_len) changes
        nothing. Returns the same state."""
        if not isinstance(state, UserStates) or state.encoder is not self.run.model.encoder:
            raise RecsysError("update(state, events): pass a state from this Recommender's new_state()")
        frame, types = self._events(events)
        known, unknown = to_model_space(self.run.data, frame)
        users = known["user_id"].unique().to_list()
        before = {u: (state.states.get(u), list(state.seen.get(u, []))) for u in users}
        try:
            state.consume(known)
        except RecsysError:  # e.g. SASRec past its max_len: the state stays as it was
            for user, (kept, seen) in before.items():
                if kept is None:
                    state.states.pop(user, None)
                    state.seen.pop(user, None)
                else:
                    state.states[user], state.seen[user] = kept, seen
            raise
        state.unknown_items += unknown
        state.id_types = state.id_types or types
        return state


def _chunks(users: pl.DataFrame) -> list[pl.DataFrame]:
    return [users.slice(i, CHUNK_USERS) for i in range(0, len(users), CHUNK_USERS)]


def _id_types(frame: pl.DataFrame) -> dict[str, pl.DataType]:
    return {c: id_type(frame[c]) for c in EVENT_COLUMNS if c in frame.columns}


def _original_ids(out: pl.DataFrame, types: dict[str, pl.DataType]) -> pl.DataFrame:
    """`out` with its id columns (strings) back in the input's types, where every id converts (an id of
    the model's item table that is not of the input's type keeps every id of that column as text)."""
    return with_id_types(out, {c: output_type(out[c], t) for c, t in types.items() if c in out.columns})


def _empty(columns: tuple[str, ...]) -> pl.DataFrame:
    types = {
        "user_id": pl.String,
        "item_id": pl.String,
        "score": pl.Float32,
        "rank": pl.Int32,
        "cold": pl.Boolean,
        "known_item": pl.Boolean,
    }
    return pl.DataFrame(schema={c: types[c] for c in columns})
