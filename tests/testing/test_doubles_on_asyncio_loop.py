"""The test doubles also run on the standard asyncio loop (the other tests run on uvloop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from poise.testing import HttpBackend, RecordedRequest, Response, ScriptedBackend, raw_request

pytestmark = pytest.mark.timeout(30)


async def scenario() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    async def handler(request: RecordedRequest) -> Response:
        return Response(body=stream() if request.target == "/s" else request.target.encode())

    async with HttpBackend("u", handler) as backend:
        port = backend.port
        keep = b"GET /1 HTTP/1.1\r\n\r\nGET /s HTTP/1.1\r\nConnection: close\r\n\r\n"
        answer = await raw_request("127.0.0.1", port, keep)
        assert answer.count(b"HTTP/1.1 200 OK") == 2
        assert b"\r\n\r\n/1" in answer and answer.endswith(b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
        assert backend.connections_accepted == 1
        await backend.stop()
        with pytest.raises(OSError):
            await raw_request("127.0.0.1", port, b"x")
        await backend.start()
        assert backend.port == port
        answer = await raw_request("127.0.0.1", port, b"GET /2 HTTP/1.0\r\n\r\n")
        assert answer.endswith(b"\r\n\r\n/2")

    async with ScriptedBackend(b"HTTP/1.0 204 No Content\r\n\r\n", close_after_reply=True) as sb:
        assert await raw_request("127.0.0.1", sb.port, b"GET / HTTP/1.1\r\n\r\n") == (
            b"HTTP/1.0 204 No Content\r\n\r\n"
        )
        assert sb.received == [b"GET / HTTP/1.1\r\n\r\n"]


def test_backends_on_the_standard_asyncio_loop() -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        assert type(runner.get_loop()).__module__.startswith("asyncio")
        runner.run(asyncio.wait_for(scenario(), 20))
