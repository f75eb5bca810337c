"""Draining (SIGTERM, and the old worker of a rolling restart) loses no request.

A kept-alive connection gets ``Connection: close`` on its next response and is closed after
it; one idle when the drain begins may already have a request on the wire, so it stays open
for ``timeouts.drain_idle`` and a request arriving meanwhile is served. Clients here never
retry: a request written and not answered is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from poise.config import parse_config
from poise.server import Server
from poise.testing import HttpBackend, RecordedRequest, Response
from tests.integration.load import Hammer, read_response
from tests.integration.support import eventually, full, until_started

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("wire_hub")]

GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
# Under load, a connection idle when the drain begins gets its next request within moments;
# a loaded test box may not schedule the client that soon: room for that (no cost: under
# load none stays idle, each ends on its response after the drain begins).
STALLS = {"drain_idle": "5s"}


@contextlib.asynccontextmanager
async def serving(doc: dict[str, Any]) -> AsyncIterator[tuple[Server, asyncio.Task[None]]]:
    """A Server for ``doc``; the test stops it (``server.stop()``) and may await the task."""
    server = Server(parse_config(doc))
    task = asyncio.create_task(server.serve())
    await until_started(task, server.started, 10)
    try:
        yield server, task
    finally:
        server.stop()
        await asyncio.wait_for(task, 40)


async def stop_and_wait_for_drain(server: Server) -> None:
    server.stop()
    await eventually(lambda: server.ctx is not None and server.ctx.draining)


async def test_a_request_on_a_connection_idle_when_the_drain_begins_is_served() -> None:
    async with HttpBackend("a") as a, serving(full([a.url])) as (server, task):
        reader, writer = await asyncio.open_connection(*server.addresses["web"])
        writer.write(GET)
        status, fields, _ = await asyncio.wait_for(read_response(reader), 10)
        assert status == 200 and "connection" not in fields  # kept alive; now idle
        await stop_and_wait_for_drain(server)
        writer.write(GET)  # as if already on the wire when the drain began
        status, fields, body = await asyncio.wait_for(read_response(reader), 10)
        assert (status, fields["connection"], body) == (200, "close", b"a\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after it
        writer.close()
        await asyncio.wait_for(task, 20)  # and the drain ends with it


async def test_a_connection_accepted_as_the_drain_begins_is_served() -> None:
    async with HttpBackend("a") as a, serving(full([a.url])) as (server, _):
        assert server.ctx is not None
        # the loop accepted it just before the listener closed: it is made during the drain
        server.ctx.begin_drain()
        reader, writer = await asyncio.open_connection(*server.addresses["web"])
        writer.write(GET)
        status, fields, body = await asyncio.wait_for(read_response(reader), 10)
        assert (status, fields["connection"], body) == (200, "close", b"a\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_an_idle_connection_is_closed_after_drain_idle_not_the_drain_timeout() -> None:
    timeouts = {"drain": "30s", "drain_idle": "1s"}
    async with HttpBackend("a") as a, serving(full([a.url], timeouts=timeouts)) as (server, task):
        reader, writer = await asyncio.open_connection(*server.addresses["web"])
        writer.write(GET)
        assert (await asyncio.wait_for(read_response(reader), 10))[0] == 200
        began = time.monotonic()
        server.stop()
        assert await asyncio.wait_for(reader.read(), 20) == b""
        waited = time.monotonic() - began
        writer.close()
        await asyncio.wait_for(task, 20)
    # not at once (a request may be on its way), nor only at the drain timeout
    assert 0.9 <= waited < 20, waited


async def test_a_response_begun_before_the_drain_leaves_its_connection_open_for_the_next() -> None:
    release = asyncio.Event()

    async def handler(request: RecordedRequest) -> Response:
        if request.target != "/slow":
            return Response(body=b"quick\n")

        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            await release.wait()
            yield b"last\n"

        return Response(body=body())

    async with HttpBackend("a", handler=handler) as a, serving(full([a.url])) as (server, task):
        reader, writer = await asyncio.open_connection(*server.addresses["web"])
        writer.write(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"chunked" in head.lower() and b"connection: close" not in head.lower()
        await stop_and_wait_for_drain(server)
        release.set()
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        assert b"last" in body
        # the response promised keep-alive: the client may send its next request at once
        writer.write(GET)
        status, fields, body = await asyncio.wait_for(read_response(reader), 10)
        assert (status, fields["connection"], body) == (200, "close", b"quick\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await asyncio.wait_for(task, 20)


async def test_a_drain_under_load_fails_no_request() -> None:
    connections = 8
    async with HttpBackend("a") as a, serving(full([a.url], timeouts=STALLS)) as (server, task):
        host, port = server.addresses["web"]
        async with Hammer(host, port, connections) as hammer:
            load = hammer.load
            await eventually(lambda: load.ok > 200, timeout=30)
            server.stop()
            await asyncio.wait_for(task, 30)
        # every kept-alive connection was told to close, and nothing written went unanswered
        # (connects refused once the listener closed sent no request)
        assert load.failures == [], (load.summary(), load.failures[:5])
        assert load.closes == connections, load.summary()
