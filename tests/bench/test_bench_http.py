"""The latency phases' HTTP/1.1 client against a server that drops idle keep-alive connections."""

from __future__ import annotations

import asyncio
import json

from recsys_mamba.bench._http import LoopbackClient


async def _answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one request (echoing its body), then closes the connection unannounced, as a server's
    keep-alive timeout does."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length"))
    body = json.dumps({"path": head.split(" ")[1], "got": (await reader.readexactly(length)).decode()})
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    await writer.drain()
    writer.close()


def test_a_dropped_idle_connection_is_replaced() -> None:
    async def main() -> list[tuple[int, dict]]:
        server = await asyncio.start_server(_answer_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out = []
        async with server, LoopbackClient("127.0.0.1", port, max_connections=2) as http:
            for i in range(3):
                status, body = await http.request("POST", f"/events?i={i}", {"n": i})
                out.append((status, json.loads(body)))
                await asyncio.sleep(0.05)  # the server has closed the connection the client keeps
        return out

    answers = asyncio.run(main())
    assert [s for s, _ in answers] == [200, 200, 200]
    assert [a["path"] for _, a in answers] == ["/events?i=0", "/events?i=1", "/events?i=2"]
    assert [json.loads(a["got"]) for _, a in answers] == [{"n": 0}, {"n": 1}, {"n": 2}]
