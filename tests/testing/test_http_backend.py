"""Behaviour of poise.testing.HttpBackend, checked over real sockets on 127.0.0.1.

Responses are parsed here by hand (not with httptools) so that the tests do not
trust the parser the backend itself uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import pytest

from poise.testing import HttpBackend, RecordedRequest, Response, echo_handler

pytestmark = pytest.mark.timeout(30)

STEP = 5.0  # upper bound for any single network step; never a sleep


class Conn:
    """A minimal HTTP/1.1 client connection for tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, backend: HttpBackend) -> Conn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", backend.port), STEP
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), STEP)

    async def response(self, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read one response: (status, headers with lower-case names, decoded body)."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), STEP)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if head_request or status in (101, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            length = int(headers["content-length"])
            return status, headers, await self.read_exactly(length)
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, b"".join([c async for c in self.chunks()])
        return status, headers, await self.read_to_eof()

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), STEP)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                assert await self.read_exactly(2) == b"\r\n"
                return
            chunk = await self.read_exactly(size + 2)
            assert chunk.endswith(b"\r\n")
            yield chunk[:-2]

    async def read_exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), STEP)

    async def read_to_eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), STEP)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), STEP)


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_default_response_bytes() -> None:
    async with HttpBackend("b1") as backend:
        assert backend.url == f"http://127.0.0.1:{backend.port}" and backend.port > 0
        conn = await Conn.open(backend)
        await conn.send(GET)
        expected = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nb1\n"
        assert await conn.read_exactly(len(expected)) == expected
        await conn.close()
        request = backend.requests[0]
        assert (request.method, request.target, request.version) == ("GET", "/", "1.1")
        assert request.headers == [("Host", "t")] and request.body == b""
        assert request.header("HOST") == "t" and request.header("x-missing") is None


async def test_head_gets_headers_without_body() -> None:
    async with HttpBackend("b1") as backend:
        conn = await Conn.open(backend)
        await conn.send(
            b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        everything = await conn.read_to_eof()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\n"
        assert everything.startswith(head + b"HTTP/1.1 200 OK\r\n")  # nothing between the two
        assert everything.endswith(b"\r\n\r\nb1\n")
        await conn.close()
        assert [r.method for r in backend.requests] == ["HEAD", "GET"]


async def test_keep_alive_reuses_one_connection() -> None:
    async with HttpBackend("b1") as backend:
        conn = await Conn.open(backend)
        for i in range(3):
            await conn.send(f"GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            status, headers, body = await conn.response()
            assert (status, body) == (200, b"b1\n") and "connection" not in headers
        await conn.close()
        assert backend.connections_accepted == 1
        assert [r.target for r in backend.requests] == ["/0", "/1", "/2"]
        assert len({r.connection_id for r in backend.requests}) == 1


async def test_connection_close_is_honoured() -> None:
    async with HttpBackend("b1") as backend:
        conn = await Conn.open(backend)
        await conn.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        status, headers, body = await conn.response()
        assert (status, headers["connection"], body) == (200, "close", b"b1\n")
        assert await conn.read_to_eof() == b""  # the server closed
        await conn.close()
        await backend.wait_until(lambda: backend.open_connections == 0)


async def test_http10_closes_unless_keep_alive_requested() -> None:
    async with HttpBackend("b1") as backend:
        conn = await Conn.open(backend)
        await conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await conn.response()
        assert headers["connection"] == "keep-alive"
        await conn.send(b"GET /2 HTTP/1.0\r\n\r\n")
        status, headers, body = await conn.response()
        assert (status, headers["connection"], body) == (200, "close", b"b1\n")
        assert await conn.read_to_eof() == b""
        await conn.close()
        assert backend.connections_accepted == 1
        assert [r.version for r in backend.requests] == ["1.0", "1.0"]


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: RecordedRequest) -> Response:
        n = int(request.target.strip("/"))
        return Response(body=request.target.encode(), delay=0.05 * (3 - n))

    async with HttpBackend(handler=slow_first) as backend:
        conn = await Conn.open(backend)
        await conn.send(
            b"".join(f"GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(4))
        )
        bodies = [(await conn.response())[2] for _ in range(4)]
        assert bodies == [b"/0", b"/1", b"/2", b"/3"]
        await conn.close()
        assert backend.connections_accepted == 1


async def test_chunked_request_body_is_decoded() -> None:
    async with HttpBackend(handler=echo_handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
        )
        status, headers, body = await conn.response()
        assert (status, body) == (200, b"hello, world")
        assert json.loads(headers["x-request-headers"]) == [
            ["Host", "t"],
            ["Transfer-Encoding", "chunked"],
        ]
        await conn.close()
        assert backend.requests[0].body == b"hello, world"
        assert backend.requests[0].trailers == [("X-Trailer", "yes")]


async def test_large_body_is_echoed_byte_exact() -> None:
    payload = os.urandom(5 * 1024 * 1024)
    async with HttpBackend(handler=echo_handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(b"PUT /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        status, headers, body = await conn.response()
        assert status == 200 and headers["content-length"] == str(len(payload))
        assert body == payload
        await conn.close()
        assert backend.requests[0].body == payload


async def test_streaming_response_is_sent_chunked_as_produced() -> None:
    release = asyncio.Event()

    async def stream() -> AsyncIterator[bytes]:
        yield b"first"
        await release.wait()  # the first chunk must reach the client before this
        yield b""  # skipped: an empty chunk would end the body
        yield b"second"

    async def handler(request: RecordedRequest) -> Response:
        if request.target == "/stream":
            return Response(headers=[("Content-Type", "text/plain")], body=stream())
        return Response(body=b"plain")

    async with HttpBackend(handler=handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(b"GET /stream HTTP/1.1\r\n\r\n")
        status, headers, _ = await conn.response(head_request=True)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers
        chunks = conn.chunks()
        assert await anext(chunks) == b"first"
        release.set()
        assert [c async for c in chunks] == [b"second"]
        await conn.send(GET)  # the connection is still usable
        assert (await conn.response())[2] == b"plain"
        await conn.close()


async def test_streaming_to_http10_is_unframed_and_closes() -> None:
    async def stream() -> AsyncIterator[bytes]:
        for part in (b"a", b"b", b"c"):
            yield part

    async def handler(request: RecordedRequest) -> Response:
        return Response(body=stream())

    async with HttpBackend(handler=handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = await conn.response()
        assert (status, headers["connection"], body) == (200, "close", b"abc")
        assert "transfer-encoding" not in headers
        await conn.close()


async def test_stop_refuses_connections_and_start_rebinds_same_port() -> None:
    backend = HttpBackend("b1")
    await backend.start()
    try:
        port = backend.port
        idle = await Conn.open(backend)
        await backend.wait_until(lambda: backend.open_connections == 1)
        await backend.stop()
        assert backend.open_connections == 0 and not backend.running
        with contextlib.suppress(ConnectionResetError):
            assert await idle.read_to_eof() == b""  # the open connection was dropped
        await idle.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

        await backend.start()
        assert backend.port == port
        conn = await Conn.open(backend)
        await conn.send(GET)
        assert (await conn.response())[2] == b"b1\n"
        await conn.close()
        assert backend.connections_accepted == 2
    finally:
        await backend.stop()


async def test_stop_called_by_a_handler_drops_its_connection() -> None:
    backend = HttpBackend("dying")

    async def handler(request: RecordedRequest) -> Response:
        await backend.stop()  # the backend dies while handling a request
        return Response(body=b"never sent")

    backend.handler = handler
    async with backend:
        conn = await Conn.open(backend)
        await conn.send(GET)
        with contextlib.suppress(ConnectionResetError):
            assert await conn.read_to_eof() == b""
        await conn.close()
        await backend.wait_until(lambda: backend.open_connections == 0)
        assert not backend.running and backend.errors == [] and len(backend.requests) == 1
        await backend.start()  # and comes back
        conn = await Conn.open(backend)
        backend.handler = echo_handler
        await conn.send(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
        assert (await conn.response())[2] == b"ok"
        await conn.close()


async def test_client_leaving_mid_stream_is_not_an_error() -> None:
    finished = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
        finally:
            finished.set()

    async def handler(request: RecordedRequest) -> Response:
        return Response(body=endless())

    async with HttpBackend(handler=handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(GET)
        await conn.response(head_request=True)
        assert len(await anext(conn.chunks())) == 65536
        conn.writer.transport.abort()
        await asyncio.wait_for(finished.wait(), STEP)  # the generator was closed
        await backend.wait_until(lambda: backend.open_connections == 0)
        assert backend.errors == []


async def test_handler_exception_gives_500_and_is_recorded() -> None:
    async def handler(request: RecordedRequest) -> Response:
        if request.target == "/boom":
            raise RuntimeError("boom")
        return Response(body=b"fine")

    async with HttpBackend(handler=handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(b"GET /boom HTTP/1.1\r\n\r\n")
        status, _, body = await conn.response()
        assert status == 500 and b"boom" in body
        assert len(backend.errors) == 1 and isinstance(backend.errors[0], RuntimeError)
        await conn.send(b"GET /ok HTTP/1.1\r\n\r\n")  # the server survived
        assert await conn.response() == (200, {"content-length": "4"}, b"fine")
        await conn.close()


async def test_streaming_body_error_is_recorded_and_aborts() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ValueError("mid-stream")

    async def handler(request: RecordedRequest) -> Response:
        return Response(body=stream())

    async with HttpBackend(handler=handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(GET)
        await conn.response(head_request=True)
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            rest = await conn.read_to_eof()
        assert not rest.endswith(b"0\r\n\r\n")  # never a clean end
        await conn.close()
        assert [type(e) for e in backend.errors] == [ValueError]


async def test_malformed_request_gets_400_and_close() -> None:
    async with HttpBackend() as backend:
        conn = await Conn.open(backend)
        await conn.send(b"GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n")
        status, headers, _ = await conn.response()
        assert (status, headers["connection"]) == (400, "close")
        assert await conn.read_to_eof() == b""
        await conn.close()
        assert backend.requests == [] and backend.statistics()["bad_requests"] == 1


async def test_expect_100_continue() -> None:
    async with HttpBackend(handler=echo_handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert await conn.read_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(b"data")
        assert (await conn.response())[2] == b"data"
        await conn.close()


async def test_upgrade_101_switches_to_echo_and_declined_upgrade_continues() -> None:
    async def handler(request: RecordedRequest) -> Response:
        if request.target == "/ws":
            return Response(101, [("Upgrade", "test"), ("Connection", "Upgrade")])
        return Response(body=b"plain")

    upgrade = b"GET %s HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n"
    async with HttpBackend(handler=handler) as backend:
        conn = await Conn.open(backend)
        await conn.send(upgrade % b"/no" + GET)  # declined: HTTP goes on, pipelined
        assert (await conn.response())[2] == b"plain"
        assert (await conn.response())[2] == b"plain"
        await conn.send(upgrade % b"/ws" + b"ping")
        status, headers, _ = await conn.response()
        assert (status, headers["upgrade"]) == (101, "test")
        assert await conn.read_exactly(4) == b"ping"
        await conn.send(b"pong")
        assert await conn.read_exactly(4) == b"pong"
        await conn.close()


async def test_statistics_repr_and_wait_for_requests() -> None:
    backend = HttpBackend("stats")
    assert "stopped" in repr(backend)
    async with backend:
        conn = await Conn.open(backend)
        await conn.send(GET + GET)
        await backend.wait_for_requests(2)
        await conn.response()
        await conn.response()
        assert backend.statistics() == {
            "connections_accepted": 1,
            "open_connections": 1,
            "errors": 0,
            "requests": 2,
            "bad_requests": 0,
        }
        text = repr(backend)
        assert "\n" not in text and "'stats'" in text and "requests=2" in text
        with pytest.raises(TimeoutError):
            await backend.wait_for_requests(3, timeout=0.05)
        await conn.close()
