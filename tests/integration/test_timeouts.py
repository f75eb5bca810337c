"""Client-side timeouts from the coarse timer: slow heads and idle keep-alive connections."""

from __future__ import annotations

import asyncio
import time

import pytest

from poise.testing import HttpBackend
from tests.integration.support import address, full, running

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")


async def test_slow_request_head_gets_408_and_close() -> None:
    async with HttpBackend() as backend:
        doc = full([backend.url], health={"enabled": False}, timeouts={"client_header": "500ms"})
        async with running(doc) as (_, url):
            host, port = address(url)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
            started = time.monotonic()
            async with asyncio.timeout(10):
                answer = await reader.read()
            elapsed = time.monotonic() - started
            writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in answer
    assert 0.2 < elapsed < 5
    assert backend.requests == []


async def test_idle_keep_alive_connection_closed_after_client_idle() -> None:
    async with HttpBackend() as backend:
        doc = full([backend.url], health={"enabled": False}, timeouts={"client_idle": "500ms"})
        async with running(doc) as (server, url):
            host, port = address(url)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
                rest = await reader.read()  # EOF once the idle timeout fires, no bytes
            writer.close()
            assert rest == b""
            assert server.ctx is not None
            assert server.ctx.stats.client_timeouts == 1


async def test_connection_without_any_request_is_closed_at_header_timeout() -> None:
    async with HttpBackend() as backend:
        doc = full([backend.url], health={"enabled": False}, timeouts={"client_header": "300ms"})
        async with running(doc) as (_, url):
            host, port = address(url)
            reader, writer = await asyncio.open_connection(host, port)
            async with asyncio.timeout(10):
                assert await reader.read() == b""
            writer.close()
