"""The service's Prometheus metrics, in a registry of its own (two apps in one process, as in the tests,
do not share counters): requests by route and status, latency per route, events applied, skipped as
duplicates or unknown, events per store transaction, users in the store (read at scrape time), and where
an event's time goes (`recsys_stage_seconds`: waiting for the writer, the step, the commit, the reply)
and the garbage collector's pauses, so a slow request can be told from a slow disk or a collection."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: the goals are in milliseconds (20 ms for event -> top-10), so the buckets are dense there.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# queue: an event request from its arrival at the writer to its batch's start; step: the batch's encoder
# steps and state (de)serialisation; commit: the store's transaction (with its fsync); wake: the batch's
# end to the request's handler running again (the event loop's hand-back).
STAGES = ("queue", "step", "commit", "wake")


class Metrics:
    def __init__(self, users_in_store: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recsys_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "recsys_request_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.events_applied = Counter("recsys_events_applied", "events applied to user states", registry=r)
        self.events_duplicate = Counter(
            "recsys_events_duplicate", "events skipped: their event_id was applied before", registry=r
        )
        self.unknown_items = Counter(
            "recsys_unknown_items", "events or scored items of item ids the model does not know", registry=r
        )
        self.events_rejected = Counter(
            "recsys_events_rejected", "events of refused requests (bad input, unknown items)", registry=r
        )
        self.commit_events = Histogram(
            "recsys_commit_events", "events per store transaction", buckets=BATCH_BUCKETS, registry=r
        )
        stage = Histogram(
            "recsys_stage_seconds", "time of an event request by stage", ["stage"], buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.stage = {name: stage.labels(name) for name in STAGES}
        self.gc_pause = Histogram(
            "recsys_gc_pause_seconds", "garbage collector pauses by generation", ["generation"],
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.users = Gauge("recsys_users_in_store", "users with a stored state", registry=r)
        self.users.set_function(lambda: float(users_in_store()))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class GCTimer:
    """Times the collector's pauses into `histogram` while installed (gc.callbacks)."""

    def __init__(self, histogram: Histogram) -> None:
        self.children = [histogram.labels(str(g)) for g in range(3)]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.children[info["generation"]].observe(time.perf_counter() - self._start)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
