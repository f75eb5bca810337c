"""l7/attempts.py: what happens to an attempt whose connection goes away before use.

A backend can accept a connection and drop it at once (killed just then, say): the connect
succeeded, but by the time the request would be written the transport is closed. Found under
tests/integration/test_chaos.py: the write raised inside the connect task and the request was
never answered. Now it counts as a failed connect: nothing was sent, so the request goes to
another backend, or gets 503 when none is left.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from tests.l7.test_memo import GET, Sink
from tests.l7.test_shortcuts import ConnectLoop

from poise.config import parse_config
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.routing import build_table


class DroppingLoop(ConnectLoop):
    """In-memory connections (``ConnectLoop``); the first ``drops`` of them are closed by
    their peer before the caller gets them back."""

    def __init__(self, drops: int) -> None:
        super().__init__()
        self.drops = drops

    async def create_connection(  # type: ignore[override]
        self, factory: Callable[[], Any], *args: Any, **kwargs: Any
    ) -> tuple[Sink, Any]:
        sink, protocol = await super().create_connection(factory, *args, **kwargs)
        if self.drops:
            self.drops -= 1
            sink.closed = True  # the transport is closing ...
            protocol.connection_lost(ConnectionResetError())  # ... and then lost
        return sink, protocol


def scenario(backends: int, drops: int) -> tuple[bytes, list[bytes], dict[str, int]]:
    """One GET through a fresh client connection; (what the client got, what each backend
    connection got, counters)."""
    loop = DroppingLoop(drops)

    async def go() -> tuple[bytes, list[bytes], dict[str, int]]:
        doc = {
            "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
            "upstreams": {
                "app": {
                    "backends": [f"http://127.0.0.1:{9 + i}" for i in range(backends)],
                    "health_check": {"enabled": False},
                }
            },
        }
        config = parse_config(doc)
        ctx = Context(config, build_table(config, random.Random(1)), asyncio.get_running_loop())
        client = ClientConnection(ctx, "web")
        sink = Sink()
        client.connection_made(sink)  # type: ignore[arg-type]
        client.data_received(GET)
        for _ in range(200):  # the connect tasks run
            await asyncio.sleep(0)
            if client.queue and client.queue[0].conn is not None:
                break
        ex = client.queue[0] if client.queue else None
        if ex is not None and ex.conn is not None:
            ex.conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        s = ctx.stats
        counts = {
            "connect_errors": s.upstream_connect_errors,
            "retries": s.retries,
            "no_healthy": s.no_healthy_backend,
        }
        return sink.data(), [b.data() for b, _ in loop.made], counts

    try:
        return loop.run_until_complete(go())
    finally:
        loop.close()


def test_a_connection_dropped_before_use_is_a_failed_connect_and_the_next_backend_serves() -> None:
    got, sent, counts = scenario(backends=2, drops=1)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nok")
    assert sent[0] == b""  # nothing was written to the dropped connection
    assert sent[1].startswith(b"GET /a?x=1 HTTP/1.1\r\n")
    assert counts == {"connect_errors": 1, "retries": 1, "no_healthy": 0}


def test_when_every_connection_is_dropped_before_use_the_client_gets_503() -> None:
    got, sent, counts = scenario(backends=2, drops=2)
    assert got.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), got
    assert got.endswith(b"No healthy server available\n")
    assert sent == [b"", b""]
    assert counts["connect_errors"] == 2 and counts["no_healthy"] == 1
