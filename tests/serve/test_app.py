"""The service over HTTP: replayed events give the batch job's recommendations, retried event ids apply
once, one user's events keep their order under concurrent requests, a restart finds every acknowledged
state, and bad input is refused with a 4xx that changes nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from recsys_mamba import Recommender
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs.bundle import MODEL_JSON
from recsys_mamba.serving.service import Service, Settings
from tests.serve.conftest import events_of, serving

K = 5


def post_events(client: httpx.Client, frame: pl.DataFrame, chunk: int = 7) -> None:
    """`frame`'s events in time order, `chunk` per request (each request mixes users)."""
    rows = frame.sort("timestamp", maintain_order=True).to_dicts()
    for start in range(0, len(rows), chunk):
        r = client.post("/events", json={"events": rows[start : start + chunk]})
        assert r.status_code == 200, r.text


def top_items(client: httpx.Client, user: str, k: int = K) -> tuple[list[str], np.ndarray, bool]:
    body = client.get(f"/recommendations/{user}", params={"k": k}).json()
    return [i["item_id"] for i in body["items"]], np.array([i["score"] for i in body["items"]]), body["cold"]


@pytest.mark.parametrize("name", ["mamba", "sasrec", "gru4rec"])
def test_replayed_events_give_the_batch_recommendations(name, request, tmp_path: Path) -> None:
    model = request.getfixturevalue(f"{name}_bundle")
    events = events_of(model)
    lengths = events.group_by("user_id").len()
    users = lengths.filter(pl.col("len") <= 20)["user_id"].sort().head(6)  # within SASRec's max_len
    some = events.filter(pl.col("user_id").is_in(users.implode()))
    rec = Recommender.load(model["bundle"])
    batch = rec.recommend(some, k=K)  # = python -m recsys_mamba.score mode=topk (tests/test_api.py)
    with serving(model["bundle"], f"sqlite:///{tmp_path}/state.db") as url, httpx.Client(base_url=url) as c:
        post_events(c, some)
        for user in users.to_list():
            want = batch.filter(pl.col("user_id") == user)
            items, scores, cold = top_items(c, user)
            assert not cold
            assert items == want["item_id"].to_list()
            np.testing.assert_allclose(scores, want["score"].to_numpy(), rtol=0, atol=1e-5)
        # pair scores: the same as Recommender.score with the same history
        user = users[0]
        candidates = rec.item_ids[:6]
        if name == "mamba":
            got = c.post("/score", json={"user_id": user, "items": [*candidates, "no-such-item"]}).json()
            want = rec.score(pl.DataFrame({"user_id": [user] * 6, "item_id": candidates}), history=some)
            np.testing.assert_allclose(
                [s["score"] for s in got["scores"][:6]], want["score"].to_numpy(), rtol=0, atol=1e-5
            )
            assert got["scores"][6] == {"item_id": "no-such-item", "score": None, "known_item": False}
        # an unknown user gets the cold-start list
        items, _, cold = top_items(c, "never-seen")
        cold_list = rec.recommend(rec.new_state(), k=K, users=["never-seen"])["item_id"].to_list()
        assert cold and items == cold_list


def test_retried_event_ids_apply_once_and_a_restart_keeps_every_state(mamba_bundle, tmp_path: Path) -> None:
    events = events_of(mamba_bundle)
    users = events["user_id"].unique().sort().head(4)
    some = events.filter(pl.col("user_id").is_in(users.implode())).sort("timestamp", maintain_order=True)
    rows = [{**r, "event_id": f"e{i}"} for i, r in enumerate(some.to_dicts())]
    store = f"sqlite:///{tmp_path}/state.db"
    with serving(mamba_bundle["bundle"], store) as url, httpx.Client(base_url=url) as c:
        first = c.post("/events", json={"events": rows[:10]}).json()
        assert first == {"applied": 10, "duplicates": 0, "unknown_items": 0}
        again = c.post("/events", json={"events": rows[5:15]}).json()  # a retry overlapping the first
        assert again == {"applied": 5, "duplicates": 5, "unknown_items": 0}
        # the same id twice in one request, and the rest
        assert c.post("/events", json={"events": rows[15:] + rows[15:16]}).json()["duplicates"] == 1
        before = {u: top_items(c, u) for u in users.to_list()}
        metrics = c.get("/metrics").text
        assert "recsys_events_duplicate_total 6.0" in metrics
        assert "recsys_users_in_store 4.0" in metrics
    rec = Recommender.load(mamba_bundle["bundle"], max_len=1000)
    want = rec.recommend(some, k=K)
    with serving(mamba_bundle["bundle"], store) as url, httpx.Client(base_url=url) as c:
        for user in users.to_list():
            items, scores, _ = top_items(c, user)
            assert items == before[user][0] and np.array_equal(scores, before[user][1])  # bit for bit
            assert items == want.filter(pl.col("user_id") == user)["item_id"].to_list()
        assert c.post("/events", json={"events": rows[:3]}).json()["duplicates"] == 3  # ids survive too


def test_one_users_events_keep_their_order_under_concurrent_requests(mamba_bundle, tmp_path: Path) -> None:
    """Eight clients each send one user's events one request at a time, all at once: every user's state
    equals its events streamed in order (the writer batched users together: commits hold > 1 event)."""
    events = events_of(mamba_bundle)
    users = events["user_id"].unique().sort().head(8).to_list()
    some = events.filter(pl.col("user_id").is_in(users)).sort("timestamp", maintain_order=True)

    async def client(url: str, user: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            for row in some.filter(pl.col("user_id") == user).to_dicts():
                assert (await c.post("/events", json={"events": [row]})).status_code == 200

    async def all_clients(url: str) -> None:
        await asyncio.gather(*(client(url, u) for u in users))

    with serving(mamba_bundle["bundle"], f"sqlite:///{tmp_path}/state.db") as url:
        asyncio.run(all_clients(url))
        with httpx.Client(base_url=url) as c:
            got = {u: top_items(c, u) for u in users}
            metrics = c.get("/metrics").text
    rec = Recommender.load(mamba_bundle["bundle"], max_len=1000)
    want = rec.recommend(some, k=K)
    for user in users:
        assert got[user][0] == want.filter(pl.col("user_id") == user)["item_id"].to_list()
    lines = metrics.splitlines()
    total = sum(float(line.split()[-1]) for line in lines if line.startswith("recsys_commit_events_count"))
    assert total < len(some)  # fewer transactions than events: concurrent events shared commits
    stages = {
        line.split('"')[1]: float(line.split()[-1])
        for line in lines
        if line.startswith("recsys_stage_seconds_count")
    }
    # Every request waited in the queue and was woken once; every transaction timed its step and commit.
    assert stages == {"queue": len(some), "wake": len(some), "step": total, "commit": total}


def test_bad_input_is_refused_and_changes_nothing(mamba_bundle, tmp_path: Path) -> None:
    item = Recommender.load(mamba_bundle["bundle"]).item_ids[0]
    store = f"sqlite:///{tmp_path}/state.db"
    with (
        serving(mamba_bundle["bundle"], store, unknown_items="reject", max_batch_events=5) as url,
        httpx.Client(base_url=url) as c,
    ):
        def refused(body: object, status: int, *, raw: bool = False) -> str:
            r = c.post("/events", content=body if raw else json.dumps(body),
                       headers={"content-type": "application/json"})
            assert r.status_code == status, r.text
            return r.json()["error"]

        assert "not valid JSON" in refused(b"{not json", 400, raw=True)
        assert "item_id" in refused({"events": [{"user_id": "u1"}]}, 422)
        assert "events" in refused({"evnts": []}, 422)
        assert "item_id" in refused({"events": [{"user_id": "u1", "item_id": 1.5}]}, 422)
        assert "user_id" in refused({"events": [{"user_id": "", "item_id": item}]}, 422)
        assert "timestamp" in refused({"events": [{"user_id": "u", "item_id": item, "timestamp": "x"}]}, 422)
        good = {"user_id": "u1", "item_id": item}
        assert "max_batch_events=5" in refused({"events": [good] * 6}, 413)
        msg = refused({"events": [good, {"user_id": "u1", "item_id": "no-such-item"}]}, 422)
        assert "no-such-item" in msg and "unknown_items=ignore" in msg
        huge = b"[" + b" " * (2 << 20) + b"]"
        r = c.post("/events", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/recommendations/u1", params={"k": 0}).status_code == 422
        assert c.post("/score", json={"user_id": "u1", "items": ["no-such-item"]}).status_code == 422
        assert c.get("/healthz").json()["users"] == 0  # nothing was applied
        metrics = c.get("/metrics").text
        assert "recsys_unknown_items_total 2.0" in metrics
        assert 'recsys_requests_total{route="/events",status="422"}' in metrics
    # ignore: the unknown event is skipped and counted, the known one applied
    with serving(mamba_bundle["bundle"], store) as url, httpx.Client(base_url=url) as c:
        r = c.post("/events", json={"events": [good, {"user_id": "u1", "item_id": "no-such-item"}]})
        assert r.json() == {"applied": 1, "duplicates": 0, "unknown_items": 1}
        assert "recsys_unknown_items_total 1.0" in c.get("/metrics").text


def test_a_bundle_of_a_newer_format_or_another_models_store_is_refused(
    mamba_bundle, sasrec_bundle, tmp_path: Path
) -> None:
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(mamba_bundle["bundle"], newer)
    meta = json.loads((newer / MODEL_JSON).read_text())
    meta["format_version"] = 99
    (newer / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(RecsysError, match=r"bundle format 99.*upgrade recsys-mamba"):
        Service.open(newer, f"sqlite:///{tmp_path}/a.db", Settings())
    Service.open(mamba_bundle["bundle"], f"sqlite:///{tmp_path}/b.db", Settings()).close()
    with pytest.raises(RecsysError, match="holds states of another model"):
        Service.open(sasrec_bundle["bundle"], f"sqlite:///{tmp_path}/b.db", Settings())
    with pytest.raises(RecsysError, match="not a store URL"):
        Service.open(mamba_bundle["bundle"], "postgres://x", Settings())


def test_a_request_the_model_cannot_take_is_refused_alone(sasrec_bundle, tmp_path: Path) -> None:
    """SASRec's cache holds max_len (40) events: a request past it is refused whole (409) while the
    requests batched with it apply; the store keeps the user as before."""
    item = Recommender.load(sasrec_bundle["bundle"]).item_ids[0]
    ok = [{"user_id": "ok", "item_id": item}]
    store = f"sqlite:///{tmp_path}/s.db"
    with serving(sasrec_bundle["bundle"], store) as url, httpx.Client(base_url=url) as c:
        thirty = {"events": [{"user_id": "long", "item_id": item}] * 30}
        assert c.post("/events", json=thirty).status_code == 200
        before = top_items(c, "long")

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url) as ac:
                too_long = {"events": [{"user_id": "long", "item_id": item}] * 11 + ok}
                posts = (ac.post("/events", json=b) for b in (too_long, {"events": ok}))
                return list(await asyncio.gather(*posts))

        refused, accepted = asyncio.run(both())
        assert refused.status_code == 409 and "max_len" in refused.json()["error"], refused.text
        assert accepted.status_code == 200 and accepted.json()["applied"] == 1
        after = top_items(c, "long")
        assert after[0] == before[0] and np.array_equal(after[1], before[1])
        assert c.get("/healthz").json()["users"] == 2  # "long" and "ok" (of the accepted request)


def test_a_failing_store_answers_503_and_acknowledges_nothing(mamba_bundle, tmp_path, monkeypatch) -> None:
    from recsys_mamba.serving.stores import SQLiteStore

    item = Recommender.load(mamba_bundle["bundle"]).item_ids[0]
    real = SQLiteStore.commit

    def disk_full(self, records, event_ids):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    store = f"sqlite:///{tmp_path}/s.db"
    with serving(mamba_bundle["bundle"], store) as url, httpx.Client(base_url=url) as c:
        monkeypatch.setattr(SQLiteStore, "commit", disk_full)
        r = c.post("/events", json={"events": [{"user_id": "u", "item_id": item, "event_id": "e1"}]})
        assert r.status_code == 503 and "nothing was acknowledged" in r.json()["error"]
        monkeypatch.setattr(SQLiteStore, "commit", real)
        assert top_items(c, "u")[2]  # still cold: the failed write left no state, not even in the cache
        r = c.post("/events", json={"events": [{"user_id": "u", "item_id": item, "event_id": "e1"}]})
        assert r.json() == {"applied": 1, "duplicates": 0, "unknown_items": 0}  # the retry applies once


def test_the_writer_redoes_a_batch_without_the_request_that_failed(sasrec_bundle, tmp_path: Path) -> None:
    from recsys_mamba.serving.ingest import Event

    service = Service.open(sasrec_bundle["bundle"], f"sqlite:///{tmp_path}/s.db", Settings())
    try:
        long = [Event("long", 1, 0, 0, f"l{i}") for i in range(41)]  # one past SASRec's max_len 40
        fine = [Event("ok", 2, 0, 0, "o1"), Event("ok", 3, 0, 0, "o2")]
        refused, applied = service.applier.apply([long, fine])
        assert refused.error is not None and "max_len" in refused.error and refused.applied == 0
        assert applied.error is None and applied.applied == 2
        assert set(service.store.get(["long", "ok"])) == {"ok"}
        assert service.store.applied(["l0", "o1", "o2"]) == {"o1", "o2"}
    finally:
        service.close()


def test_concurrent_requests_for_one_user_lose_no_update(mamba_bundle, tmp_path: Path) -> None:
    """Twenty requests for the same user at once: every event applies (none overwrites another's
    state), and the state is the replay of the events in the order the writer applied them."""
    from recsys_mamba.runs.inference import HIDDEN

    rec = Recommender.load(mamba_bundle["bundle"])
    items = rec.item_ids[:20]
    store = f"sqlite:///{tmp_path}/s.db"

    async def burst(url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            posts = [c.post("/events", json={"events": [{"user_id": "u", "item_id": i}]}) for i in items]
            assert all(r.status_code == 200 for r in await asyncio.gather(*posts))

    with serving(mamba_bundle["bundle"], store) as url:
        asyncio.run(burst(url))
    service = Service.open(mamba_bundle["bundle"], store, Settings())
    try:
        stored = service.user("u")
    finally:
        service.close()
    index = rec.run.vocabulary.items.index
    assert stored is not None and sorted(stored.seen) == sorted(index[i] for i in items)
    applied_order = [rec.run.vocabulary.items.ids[j] for j in stored.seen]
    replay = rec.update(rec.new_state(), pl.DataFrame({"user_id": ["u"] * 20, "item_id": applied_order}))
    np.testing.assert_allclose(stored.state[HIDDEN], replay.states["u"][HIDDEN], rtol=0, atol=1e-5)
