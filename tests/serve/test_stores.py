"""State stores: SQLite and a real Redis server hold the same states, survive a restart of the service,
and a Redis whose append-only file is not fsynced as required is refused; the entry point's config."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError
from recsys_mamba.serving.stores import SQLiteStore, UserRecord, open_store
from tests.serve.conftest import events_of, serving


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_store_commit_is_all_or_nothing_and_reads_back(kind, request, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else request.getfixturevalue("redis_url")
    store = open_store(url)
    try:
        store.bind("model-a")
        records = {
            f"{kind}-u{i}": UserRecord(bytes([i]) * 10, UserRecord.pack_seen([i, i + 1])) for i in range(3)
        }
        store.commit(records, [f"{kind}-e1", f"{kind}-e2"])
        got = store.get([*records, "nobody"])
        assert got == records and got[f"{kind}-u2"].seen_items() == [2, 3]
        assert store.applied([f"{kind}-e1", f"{kind}-e3"]) == {f"{kind}-e1"}
        if kind == "sqlite":  # an event id applied twice: the whole transaction is refused (Redis has
            # no such constraint; the single writer checks the ids first, for both stores)
            with pytest.raises(Exception, match="UNIQUE"):
                store.commit({f"{kind}-u9": records[f"{kind}-u0"]}, [f"{kind}-e9", f"{kind}-e1"])
            assert store.get([f"{kind}-u9"]) == {} and store.applied([f"{kind}-e9"]) == set()
        with pytest.raises(RecsysError, match="another model"):
            store.bind("model-b")
    finally:
        store.close()


def test_the_service_on_redis_equals_sqlite_and_survives_a_restart(mamba_bundle, redis_url, tmp_path) -> None:
    events = events_of(mamba_bundle)
    users = events["user_id"].unique().sort().head(5).to_list()
    rows = events.filter(pl.col("user_id").is_in(users)).sort("timestamp", maintain_order=True).to_dicts()
    rows = [{**r, "event_id": f"r{i}"} for i, r in enumerate(rows)]
    redis_db = redis_url.rsplit("/", 1)[0] + "/1"  # a database of its own: the store test used db 0
    answers = {}
    for url in (f"sqlite:///{tmp_path}/state.db", redis_db):
        with serving(mamba_bundle["bundle"], url) as base, httpx.Client(base_url=base) as c:
            for start in range(0, len(rows), 9):
                assert c.post("/events", json={"events": rows[start : start + 9]}).status_code == 200
            answers[url] = {u: c.get(f"/recommendations/{u}").json()["items"] for u in users}
    with serving(mamba_bundle["bundle"], redis_db) as base, httpx.Client(base_url=base) as c:
        assert c.post("/events", json={"events": rows[:4]}).json()["duplicates"] == 4
        after = {u: c.get(f"/recommendations/{u}").json()["items"] for u in users}
        assert c.get("/healthz").json()["users"] == len(users)
    first, second = answers.values()
    for user in users:
        assert [i["item_id"] for i in first[user]] == [i["item_id"] for i in second[user]] == [
            i["item_id"] for i in after[user]
        ]
        np.testing.assert_allclose(
            [i["score"] for i in first[user]], [i["score"] for i in second[user]], rtol=0, atol=1e-6
        )


def test_sqlite_fsyncs_every_commit_unless_told_otherwise(tmp_path: Path) -> None:
    for setting, pragma in (("full", 2), ("normal", 1)):
        store = open_store(f"sqlite:///{tmp_path}/{setting}.db", sqlite_synchronous=setting)
        try:
            assert store._write.execute("PRAGMA synchronous").fetchone()[0] == pragma  # type: ignore[attr-defined]
            assert store._write.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # type: ignore[attr-defined]
        finally:
            store.close()
    with pytest.raises(RecsysError, match="sqlite_synchronous"):
        open_store(f"sqlite:///{tmp_path}/x.db", sqlite_synchronous="off")


def _commit_users(store: SQLiteStore, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        state = rng.integers(0, 255, 20_000, dtype=np.uint8).tobytes()
        store.commit({f"u{i}": UserRecord(state, UserRecord.pack_seen([i]))}, [f"e{i}"])


def test_sqlite_checkpoints_off_the_commit_path(tmp_path: Path) -> None:
    # 100 users of 20 KB: 2 MB of log, under the writer's own threshold, so only the thread copies it.
    quiet = SQLiteStore(tmp_path / "quiet.db", "sqlite:///quiet", checkpoint_s=0)
    busy = SQLiteStore(tmp_path / "busy.db", "sqlite:///busy", checkpoint_s=0.05)
    try:
        for store in (quiet, busy):
            assert store._write.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == store.BACKSTOP_PAGES
            _commit_users(store, 100)
        deadline = time.monotonic() + 10
        while (tmp_path / "busy.db").stat().st_size < 2_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "busy.db").stat().st_size > 2_000_000  # the log copied into the database
        assert (tmp_path / "quiet.db").stat().st_size < 100_000  # no commit checkpointed on its own
        assert len(busy.get([f"u{i}" for i in range(100)])) == 100
    finally:
        quiet.close()
        busy.close()
    again = open_store(f"sqlite:///{tmp_path}/busy.db")
    try:
        assert again.applied([f"e{i}" for i in range(100)]) == {f"e{i}" for i in range(100)}
    finally:
        again.close()


def test_redis_without_fsync_per_write_is_refused(redis_url) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.config_set("appendfsync", "everysec")
    try:
        with pytest.raises(RecsysError, match="--appendonly yes --appendfsync always"):
            open_store(redis_url, "always")
        open_store(redis_url, "everysec").close()  # what the operator accepted
    finally:
        client.config_set("appendfsync", "always")


def test_the_entry_points_config_is_checked(mamba_bundle, tmp_path) -> None:
    from recsys_mamba.serve import build, validate_config, with_model_alias

    assert with_model_alias(["model=b/", "port=1"]) == ["model_path=b/", "port=1"]

    def cfg(*overrides: str):
        return compose("serve", overrides=list(overrides), return_hydra_config=False)

    with pytest.raises(RecsysError, match="is required: a bundle folder"):
        validate_config(cfg())
    with pytest.raises(RecsysError, match="port"):
        validate_config(cfg(f"model_path={mamba_bundle['bundle']}", "port=70000"))
    with pytest.raises(RecsysError, match="unknown_items"):
        validate_config(cfg(f"model_path={mamba_bundle['bundle']}", "unknown_items=drop"))
    app = build(cfg(f"model_path={mamba_bundle['bundle']}", f"state_store=sqlite:///{tmp_path}/s.db"))
    assert {r.path for r in app.routes} >= {"/events", "/recommendations/{user_id}", "/score", "/healthz"}
