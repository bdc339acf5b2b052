"""The writer's pieces: the state cache stays within its bytes and falls back to the store."""

from __future__ import annotations

from pathlib import Path

from recsys_mamba.serving.ingest import Event, StateCache, state_bytes
from recsys_mamba.serving.service import Service, Settings


def test_the_cache_keeps_the_most_recent_users_within_its_bytes(mamba_bundle, tmp_path: Path) -> None:
    service = Service.open(mamba_bundle["bundle"], f"sqlite:///{tmp_path}/s.db", Settings(cache_mb=0))
    try:
        service.applier.apply([[Event(f"u{i}", i + 1, 0, 0) for i in range(5)]])
        assert service.cache.bytes == 0  # cache_mb=0: every read goes to the store
        one = state_bytes(service.cache.get(["u0"])["u0"])
        cache = StateCache(service.encoder, service.store, max_bytes=int(2.5 * one))
        found = cache.get([f"u{i}" for i in range(5)])
        assert sorted(found) == [f"u{i}" for i in range(5)]  # all read, from the store
        assert list(cache._users) == ["u3", "u4"] and cache.bytes == 2 * one  # the two most recent kept
        cache.get(["u3"])
        cache.put({"u9": found["u0"]})
        assert list(cache._users) == ["u3", "u9"]  # u4 was the least recently used
    finally:
        service.close()
