"""Events in: concurrent requests batched into one `step` call per round and one store transaction.

`Applier.apply` (one thread, the only writer) takes the requests queued since the last write: drops
event ids already applied (stored, or earlier in the same batch), advances every user's state through
the encoder's own `step` with the users of a round merged into one batch (a user's k-th event goes in
round k, so a user's events apply in arrival order), and commits the new states with the applied event
ids in one transaction. `WriteQueue` feeds it from the event loop: a request waits for the commit that
holds its events, so its acknowledgement means its events are on disk.

A request is all or nothing: when a step fails (SASRec: a history past its max_len), the batch is
redone one request per transaction and only the failing request is refused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import SequenceEncoder, State
from recsys_mamba.runs.inference import fresh_state, step_states
from recsys_mamba.serving.stores import StateStore, UserRecord


@dataclass(frozen=True)
class Event:
    """One event in the model's space (item, category and event type indices)."""

    user_id: str
    item: int
    category: int
    event_type: int
    event_id: str | None = None


@dataclass
class Outcome:
    """What became of one request: events applied, events skipped as already applied, or an error."""

    applied: int = 0
    duplicates: int = 0
    error: str | None = None
    finished: float = field(default=0.0, repr=False, compare=False)  # perf_counter at the batch's end


@dataclass
class UserState:
    """A user's state, deserialised, and the items they have had."""

    state: State
    seen: list[int]


def state_bytes(user: UserState) -> int:
    return sum(t.numel() * t.element_size() for t in user.state.values()) + 8 * len(user.seen)


class StateCache:
    """The most recently used users' states, deserialised, up to `max_bytes` in all (a Mamba state is
    the same size at every history length, a SASRec cache grows with it, so users are not a measure):
    the store stays the truth (the cache is written only after a commit, by the single writer); this
    saves a `load_state` per event."""

    def __init__(self, encoder: SequenceEncoder, store: StateStore, max_bytes: int) -> None:
        self.encoder = encoder
        self.store = store
        self.max_bytes = max_bytes
        self.bytes = 0
        self._users: OrderedDict[str, tuple[UserState, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, users: list[str]) -> dict[str, UserState]:
        """The stored states of those of `users` the store has."""
        out: dict[str, UserState] = {}
        with self._lock:
            for user in users:
                if user in self._users:
                    self._users.move_to_end(user)
                    out[user] = self._users[user][0]
        missing = [u for u in users if u not in out]
        if missing:
            loaded = {
                u: UserState(self.encoder.load_state(r.state), r.seen_items())
                for u, r in self.store.get(missing).items()
            }
            self.put(loaded)
            out.update(loaded)
        return out

    def put(self, states: dict[str, UserState]) -> None:
        if not self.max_bytes:
            return
        with self._lock:
            for user, st in states.items():
                size = state_bytes(st)
                if user in self._users:
                    self.bytes -= self._users.pop(user)[1]
                self._users[user] = (st, size)
                self.bytes += size
            while self.bytes > self.max_bytes and self._users:
                self.bytes -= self._users.popitem(last=False)[1][1]


class Applier:
    """Applies batches of requests to the store; call from one thread only."""

    def __init__(self, encoder: SequenceEncoder, store: StateStore, cache: StateCache) -> None:
        self.encoder = encoder
        self.store = store
        self.cache = cache
        self.on_commit: Callable[[int], None] = lambda events: None  # metrics: events per transaction
        self.on_stage: Callable[[str, float], None] = lambda stage, seconds: None  # metrics: "step", "commit"

    def apply(self, requests: list[list[Event]]) -> list[Outcome]:
        """What became of each request. A store failure raises (nothing of the batch is stored); a
        request the model refuses (a RecsysError from its step) gets an Outcome with the error."""
        try:
            return self._apply(requests)
        except RecsysError as err:
            if len(requests) == 1:
                return [Outcome(error=str(err))]
        # One request's events cannot be applied: apply the requests one at a time to find it.
        outcomes = []
        for request in requests:
            try:
                outcomes += self._apply([request])
            except RecsysError as err:
                outcomes.append(Outcome(error=str(err)))
        return outcomes

    def _apply(self, requests: list[list[Event]]) -> list[Outcome]:
        ids = [e.event_id for r in requests for e in r if e.event_id is not None]
        done = self.store.applied(ids) if ids else set()
        outcomes = [Outcome() for _ in requests]
        queues: dict[str, list[Event]] = {}
        new_ids: list[str] = []
        for request, outcome in zip(requests, outcomes, strict=True):
            for event in request:
                if event.event_id is not None:
                    if event.event_id in done:
                        outcome.duplicates += 1
                        continue
                    done.add(event.event_id)
                    new_ids.append(event.event_id)
                queues.setdefault(event.user_id, []).append(event)
                outcome.applied += 1
        if not queues:
            return outcomes
        start = time.perf_counter()
        states = self.advance(queues)
        records = {
            u: UserRecord(self.encoder.save_state(st.state), UserRecord.pack_seen(st.seen))
            for u, st in states.items()
        }
        stepped = time.perf_counter()
        self.store.commit(records, new_ids)
        self.on_stage("step", stepped - start)
        self.on_stage("commit", time.perf_counter() - stepped)
        self.cache.put(states)
        self.on_commit(sum(o.applied for o in outcomes))
        return outcomes

    def advance(self, queues: dict[str, list[Event]]) -> dict[str, UserState]:
        """Every user's state after their queued events (nothing stored yet): round k steps the k-th
        event of every user that has one, as one batch."""
        stored = self.cache.get(list(queues))
        states = {
            u: UserState(stored[u].state, list(stored[u].seen))
            if u in stored
            else UserState(fresh_state(self.encoder), [])
            for u in queues
        }
        for k in range(max(map(len, queues.values()))):
            users = [u for u, q in queues.items() if len(q) > k]
            events = [queues[u][k] for u in users]
            items, cats, types = (
                torch.tensor([getattr(e, f) for e in events], dtype=torch.long)
                for f in ("item", "category", "event_type")
            )
            new = step_states(self.encoder, [states[u].state for u in users], items, cats, types)
            for user, state, event in zip(users, new, events, strict=True):
                states[user].state = state
                states[user].seen.append(event.item)
        return states


@dataclass
class Queued:
    """A request waiting for the writer: its events, its acknowledgement, when it was queued."""

    events: list[Event]
    future: asyncio.Future[Outcome]
    arrived: float


class WriteQueue:
    """The single writer: requests queue here and are applied in batches of up to `max_events` events,
    in arrival order, by one thread (so one user's events never race)."""

    def __init__(self, applier: Applier, max_events: int) -> None:
        self.applier = applier
        self.max_events = max_events
        self.on_stage: Callable[[str, float], None] = lambda stage, seconds: None  # "queue", "wake"
        self._queue: asyncio.Queue[Queued] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, events: list[Event]) -> Outcome:
        """Queue a request; returns once its events are committed (or raises what the write raised)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Queued(events, future, time.perf_counter()))
        outcome = await future
        self.on_stage("wake", time.perf_counter() - outcome.finished)
        return outcome

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            count = len(batch[0].events)
            # Whatever queued while the last batch was written joins this one: batching costs no wait.
            while count < self.max_events and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                count += len(batch[-1].events)
            start = time.perf_counter()
            for queued in batch:
                self.on_stage("queue", start - queued.arrived)
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self.applier.apply, [q.events for q in batch]
                )
            except Exception as err:  # the store failed: nothing of this batch is acknowledged
                for queued in batch:
                    if not queued.future.done():
                        queued.future.set_exception(err)
                continue
            finished = time.perf_counter()
            for queued, outcome in zip(batch, outcomes, strict=True):
                outcome.finished = finished
                if not queued.future.done():
                    queued.future.set_result(outcome)
