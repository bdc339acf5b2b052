"""The service's model side, without HTTP: a loaded model, its state store, the writer that applies
events, and the reads (top-K, pair scores) from stored states. `serving.app` puts routes on it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import Tensor

from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import Run, load_run
from recsys_mamba.runs.inference import HIDDEN, next_item_scores, popularity_scores
from recsys_mamba.serving.ingest import Applier, Event, StateCache, UserState
from recsys_mamba.serving.metrics import Metrics
from recsys_mamba.serving.stores import StateStore, open_store

UNKNOWN_ITEMS = ("ignore", "reject")


@dataclass(frozen=True)
class Settings:
    """What conf/serve.yaml says about the service itself (see there)."""

    unknown_items: str = "ignore"
    exclude_seen: bool = True
    max_batch_events: int = 1000
    max_body_bytes: int = 1 << 20
    write_batch_events: int = 4096
    cache_mb: int = 256
    redis_appendfsync: str = "always"
    sqlite_synchronous: str = "full"


def model_fingerprint(run: Run) -> str:
    """sha256 of the model's weights and item table: a store's states belong to exactly this model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(run.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update("\0".join(map(str, run.vocabulary.items.ids)).encode())
    return digest.hexdigest()


class Service:
    """A model served from `store`: `events` (through `applier`, one writer thread), `recommend`,
    `score` (any thread)."""

    def __init__(self, run: Run, store: StateStore, settings: Settings) -> None:
        if settings.unknown_items not in UNKNOWN_ITEMS:
            raise RecsysError(
                f"unknown_items={settings.unknown_items!r} must be one of {list(UNKNOWN_ITEMS)}"
            )
        self.run = run
        self.store = store
        self.settings = settings
        self.encoder = run.model.encoder
        store.bind(model_fingerprint(run))
        self.cache = StateCache(self.encoder, store, settings.cache_mb << 20)
        self.applier = Applier(self.encoder, store, self.cache)
        self.metrics = Metrics(store.n_users)
        self.applier.on_commit = self.metrics.commit_events.observe
        self.applier.on_stage = self.observe_stage
        items = run.vocabulary.items
        self.item_index = items.index
        self.item_ids = items.ids
        self.categories = items.categories
        self.type_index = {name: i for i, name in enumerate(run.vocabulary.event_type_names, start=1)}
        self.popularity = popularity_scores(run)

    @classmethod
    def open(cls, model: str | Path, state_store: str, settings: Settings) -> Service:
        """Load `model` (a bundle folder or a .ckpt; an incompatible bundle is refused here) and open
        the store."""
        run = load_run(model)
        if not hasattr(run.model.encoder, "step"):
            raise RecsysError(f"model={model}: its encoder cannot stream (no step); serve a sequence model")
        store = open_store(state_store, settings.redis_appendfsync, settings.sqlite_synchronous)
        return cls(run, store, settings)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.metrics.stage[stage].observe(seconds)

    def close(self) -> None:
        self.store.close()

    # ---- input -----------------------------------------------------------------------------------

    def unknown(self, item_ids: list[str]) -> list[str]:
        return [i for i in dict.fromkeys(item_ids) if i not in self.item_index]

    def to_events(self, rows: list[dict[str, Any]]) -> tuple[list[Event], int]:
        """Request events (user_id, item_id as text, timestamp, event_type, event_id) in the model's
        space, in time order when every event has a timestamp (as the scoring job orders them), else in
        the order given; events of unknown items dropped (the caller has applied the reject policy),
        and counted."""
        if rows and all(r.get("timestamp") is not None for r in rows):
            rows = sorted(rows, key=lambda r: r["timestamp"])
        events, unknown = [], 0
        for r in rows:
            item = self.item_index.get(r["item_id"])
            if item is None:
                unknown += 1
                continue
            kind = r.get("event_type")
            events.append(
                Event(
                    r["user_id"],
                    item,
                    int(self.categories[item]),
                    self.type_index.get(kind, 0) if kind is not None else 0,
                    r.get("event_id"),
                )
            )
        return events, unknown

    # ---- reads -----------------------------------------------------------------------------------

    def user(self, user_id: str) -> UserState | None:
        return self.cache.get([user_id]).get(user_id)

    def scores(self, found: UserState | None) -> Tensor:
        """Scores of every item (n_items + 1,) after the user's stored state: the head's ranking scores
        (`runs.inference.next_item_scores`, as `topk_from_states` ranks), popularity for a user
        without events (column 0, padding, is -inf)."""
        if not (found and found.seen):
            return self.popularity.clone()
        histories = pl.Series([found.seen], dtype=pl.List(pl.Int64))
        return next_item_scores(self.run, found.state[HIDDEN], histories)[0].detach()

    def recommend(self, user_id: str, k: int) -> dict[str, Any]:
        """Top-`k` of the user's stored state (the cold-start list for a user without one): what
        `topk_from_states` gives, without a frame per request (a third of the request's time)."""
        found = self.user(user_id)
        scores = self.scores(found)
        if self.settings.exclude_seen and found and found.seen:
            scores[torch.as_tensor(found.seen)] = float("-inf")
        values, index = scores.topk(min(k, len(scores) - 1))
        keep = torch.isfinite(values)
        ids = self.item_ids[index[keep].numpy()]
        return {
            "user_id": user_id,
            "cold": not (found and found.seen),
            "items": [
                {"item_id": str(i), "score": float(v), "rank": r}
                for r, (i, v) in enumerate(zip(ids, values[keep].tolist(), strict=True), start=1)
            ],
        }

    def score(self, user_id: str, item_ids: list[str]) -> dict[str, Any]:
        """Ranking scores of `item_ids` from the user's stored state (item popularity for a user without
        one; null for an item the model does not know): the scores `recommend` ranks by."""
        if self.run.task.name != "next_item":
            raise RecsysError(
                f"POST /score: this model is task={self.run.task.name}, whose pair score (a click "
                "probability) reads the whole encoded history, not a streaming state; score its pairs "
                "with python -m recsys_mamba.score mode=candidates"
            )
        found = self.user(user_id)
        index = [self.item_index.get(i, 0) for i in item_ids]
        row = self.scores(found)
        return {
            "user_id": user_id,
            "cold": not (found and found.seen),
            "scores": [
                {"item_id": i, "score": float(row[j]) if j else None, "known_item": j > 0}
                for i, j in zip(item_ids, index, strict=True)
            ],
        }
