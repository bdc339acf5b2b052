"""A minimal HTTP/1.1 client on asyncio streams, for the latency phases of `bench serve`: keep-alive
connections, bodies framed by Content-Length (what uvicorn sends). httpx cost the load generator
1.3-1.4 ms of CPU per request, this client 0.04 ms (BENCHMARKS.md); on a machine whose two cores the
generator shares with the service, that CPU made the generator fall behind, and its delays were
counted as the service's latency."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    async def exchange(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        try:
            return await self._exchange(head, body)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        if "content-length" not in headers:  # not framed as this client reads: read to the end
            self.reusable = False
            return status, await self.reader.read()
        self.reusable = headers.get("connection", "").lower() != "close"
        return status, await self.reader.readexactly(int(headers["content-length"]))

    def close(self) -> None:
        self.writer.close()


class LoopbackClient:
    """Requests to `host:port` over at most `max_connections` keep-alive connections."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def request(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        """The status and body of one request; `payload` (when not None) is sent as JSON."""
        body = b"" if payload is None else json.dumps(payload).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
            + ("Content-Type: application/json\r\n" if payload is not None else "")
            + "\r\n"
        ).encode("latin-1")
        async with self._slots:
            if self._idle:
                conn = self._idle.pop()
                try:
                    return self._done(conn, await conn.exchange(head, body))
                except (asyncio.IncompleteReadError, ConnectionError) as err:
                    # The server closed the idle connection (its keep-alive timeout) before reading
                    # the request: safe to send again on a new one, as any HTTP client does.
                    if isinstance(err, asyncio.IncompleteReadError) and err.partial:
                        raise
            conn = Connection(*await asyncio.open_connection(self.host, self.port))
            return self._done(conn, await conn.exchange(head, body))

    def _done(self, conn: Connection, answer: tuple[int, bytes]) -> tuple[int, bytes]:
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def __aenter__(self) -> LoopbackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
