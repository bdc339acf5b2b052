"""The HTTP side: FastAPI routes on a `Service`.

    POST /events                    {"events": [{user_id, item_id, timestamp?, event_type?, event_id?}]}
    GET  /recommendations/{user_id}?k=10
    POST /score                     {"user_id", "items": [...]}
    GET  /healthz, GET /metrics

Bad input is refused whole with a 4xx and a message, before anything is queued: 400 malformed JSON,
422 missing or mistyped fields (and unknown items under unknown_items=reject), 413 a body or batch
over the limits. Ids may be JSON strings or integers; they are matched as text, as the batch job does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys_mamba.errors import RecsysError
from recsys_mamba.serving.ingest import WriteQueue
from recsys_mamba.serving.metrics import GCTimer
from recsys_mamba.serving.service import Service

# A float id (1.0) is refused: a JSON encoder's float would not match "1"; an empty id names nobody.
Id = Annotated[StrictStr, Field(min_length=1)] | StrictInt


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    timestamp: StrictInt | None = None
    event_type: StrictStr | None = None
    event_id: Id | None = None


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1)


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    items: list[Id] = Field(min_length=1)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _validation_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "the body is not valid JSON; send a JSON object, e.g. {\"events\": [...]}")
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5]
    )
    return _error(422, f"invalid request ({where}); nothing was applied", details=errors[:20])


class Measure:
    """Counts and times every request by route, and refuses a body over max_body_bytes (413) before
    it is read. Plain ASGI: Starlette's @app.middleware("http") costs a task per request."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.metrics = service.metrics
        self.max_body = service.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        size = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if size.isdigit() and int(size) > self.max_body:
                response = _error(
                    413, f"body of {int(size)} bytes is over max_body_bytes={self.max_body}; send less per "
                    "request"
                )
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "other")  # the template, not the user id: bounded label values
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)


def build_app(service: Service) -> FastAPI:
    """The ASGI app; its lifespan starts the single writer and closes the store."""
    settings = service.settings
    metrics = service.metrics
    writer = WriteQueue(service.applier, settings.write_batch_events)
    writer.on_stage = service.observe_stage
    gc_timer = GCTimer(metrics.gc_pause)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc_timer.install()
        writer.start()
        try:
            yield
        finally:
            await writer.stop()
            gc_timer.remove()
            service.close()

    app = FastAPI(title="recsys-mamba", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _validation_error)

    app.add_middleware(Measure, service=service)

    @app.post("/events")
    async def events(body: EventsIn) -> Response:
        if len(body.events) > settings.max_batch_events:
            metrics.events_rejected.inc(len(body.events))
            return _error(
                413, f"{len(body.events)} events in one request, over max_batch_events="
                f"{settings.max_batch_events}; split the batch"
            )
        rows = [
            {
                "user_id": str(e.user_id),
                "item_id": str(e.item_id),
                "timestamp": e.timestamp,
                "event_type": e.event_type,
                "event_id": None if e.event_id is None else str(e.event_id),
            }
            for e in body.events
        ]
        unknown = service.unknown([r["item_id"] for r in rows])
        if unknown and settings.unknown_items == "reject":
            unknown_set = set(unknown)
            count = sum(r["item_id"] in unknown_set for r in rows)
            metrics.unknown_items.inc(count)
            metrics.events_rejected.inc(len(rows))
            return _error(
                422, f"{count} event(s) of item ids the model does not know (e.g. {unknown[:5]}); nothing "
                "was applied: remove them, or serve with unknown_items=ignore to skip them",
                unknown_items=unknown[:100],
            )
        converted, skipped = service.to_events(rows)
        metrics.unknown_items.inc(skipped)
        try:
            outcome = await writer.submit(converted) if converted else None
        except Exception as err:  # the store failed (disk, Redis gone): nothing of the batch is stored
            return _error(503, f"the state store failed ({err}); nothing was acknowledged: retry later")
        if outcome is not None and outcome.error is not None:
            metrics.events_rejected.inc(len(rows))
            return _error(409, f"nothing was applied: {outcome.error}")
        applied = outcome.applied if outcome else 0
        duplicates = outcome.duplicates if outcome else 0
        metrics.events_applied.inc(applied)
        metrics.events_duplicate.inc(duplicates)
        return JSONResponse({"applied": applied, "duplicates": duplicates, "unknown_items": skipped})

    @app.get("/recommendations/{user_id}")
    async def recommendations(user_id: str, k: int = Query(10, ge=1, le=10_000)) -> Response:
        # In the event loop: half a millisecond, less than a hand-off to a thread costs.
        return JSONResponse(service.recommend(user_id, k))

    @app.post("/score")
    async def score(body: ScoreIn) -> Response:
        items = [str(i) for i in body.items]
        unknown = service.unknown(items)
        if unknown:
            unknown_set = set(unknown)
            metrics.unknown_items.inc(sum(i in unknown_set for i in items))
            if settings.unknown_items == "reject":
                return _error(
                    422, f"item ids the model does not know: {unknown[:5]}; remove them, or serve with "
                    "unknown_items=ignore to get a null score for them", unknown_items=unknown[:100]
                )
        try:
            return JSONResponse(await run_in_threadpool(service.score, str(body.user_id), items))
        except RecsysError as err:
            return _error(409, str(err))

    @app.get("/healthz")
    async def healthz() -> Response:
        users = await run_in_threadpool(service.store.n_users)
        return JSONResponse(
            {
                "status": "ok",
                "model": type(service.encoder).__name__,
                "task": service.run.task.name,
                "store": service.store.url.split("://", 1)[0],
                "users": users,
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=content_type)

    return app
