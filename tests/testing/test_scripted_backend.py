"""Behaviour of poise.testing.ScriptedBackend and raw_request over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from poise.testing import HttpBackend, ScriptedBackend, raw_request

pytestmark = pytest.mark.timeout(30)

REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_records_exact_bytes_per_connection() -> None:
    async with ScriptedBackend(REPLY, close_after_reply=True) as backend:
        first = b"GET /a HTTP/1.1\r\nHost: x\r\nWeird:\t  spacing \r\n\r\n"
        second = b"GET /b HTTP/1.0\r\n\r\n"
        assert await raw_request("127.0.0.1", backend.port, first) == REPLY
        assert await raw_request("127.0.0.1", backend.port, second) == REPLY
        await backend.wait_until(lambda: backend.open_connections == 0)
        assert backend.received == [first, second]
        assert backend.connections_accepted == 2 and backend.errors == []


async def test_bytes_reply_waits_for_the_end_of_the_head() -> None:
    async with ScriptedBackend(REPLY) as backend:
        reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
        writer.write(b"GET / HTTP/1.1\r\n")
        await backend.wait_until(lambda: backend.received == [b"GET / HTTP/1.1\r\n"])
        with pytest.raises(TimeoutError):  # nothing sent for an incomplete head
            await asyncio.wait_for(reader.read(1), 0.1)
        writer.write(b"\r\n")
        assert await asyncio.wait_for(reader.readexactly(len(REPLY)), 5) == REPLY
        writer.write(b"GET /again HTTP/1.1\r\n\r\n")  # sent once per connection only
        await backend.wait_until(lambda: backend.received[0].endswith(b"/again HTTP/1.1\r\n\r\n"))
        writer.write_eof()  # the client closing its side ends the connection
        assert await asyncio.wait_for(reader.read(), 5) == b""  # no second reply, then EOF
        writer.close()
        await backend.wait_until(lambda: backend.open_connections == 0)


def received_exactly(backend: ScriptedBackend, data: bytes) -> Callable[[], bool]:
    return lambda: backend.received == [data]


async def test_callable_script_sees_accumulated_bytes() -> None:
    seen: list[bytes] = []

    def script(data: bytes) -> bytes | None:
        seen.append(data)
        if not data.endswith(b"END"):
            return None
        return b"got %d bytes" % len(data)

    async with ScriptedBackend(script, close_after_reply=True) as backend:
        reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
        sent = b""
        for part in (b"one ", b"two ", b"END"):
            writer.write(part)
            sent += part
            await backend.wait_until(received_exactly(backend, sent))
        assert await asyncio.wait_for(reader.read(), 5) == b"got 11 bytes"  # then EOF
        writer.close()
        assert seen[-1] == b"one two END"
        assert all(b"one two END".startswith(s) for s in seen)


async def test_empty_reply_closes_without_answer_and_errors_are_recorded() -> None:
    async with ScriptedBackend(lambda data: b"", close_after_reply=True) as backend:
        assert await raw_request("127.0.0.1", backend.port, b"anything") == b""

    def broken(data: bytes) -> bytes | None:
        raise RuntimeError("script bug")

    async with ScriptedBackend(broken) as backend:
        assert await raw_request("127.0.0.1", backend.port, b"x") == b""
        assert [type(e) for e in backend.errors] == [RuntimeError]
        assert "ScriptedBackend" in repr(backend) and "\n" not in repr(backend)


async def test_raw_request_returns_partial_data_on_timeout() -> None:
    async with ScriptedBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort") as backend:
        answer = await raw_request(
            "127.0.0.1", backend.port, b"GET / HTTP/1.1\r\n\r\n", timeout=0.2
        )
        assert answer.endswith(b"\r\n\r\nshort")


async def test_raw_request_can_stop_after_one_http_response() -> None:
    async with HttpBackend("keepalive") as backend:  # keeps the connection open
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await raw_request(
            "127.0.0.1", backend.port, b"GET / HTTP/1.1\r\n\r\n", read_until_close=False
        )
        assert answer.endswith(b"\r\n\r\nkeepalive\n")
        head = await raw_request(
            "127.0.0.1", backend.port, b"HEAD / HTTP/1.1\r\n\r\n", read_until_close=False
        )
        assert head.endswith(b"Content-Length: 10\r\n\r\n")
        assert loop.time() - started < 4  # did not wait for the 5 s timeout


async def test_raw_request_connection_refused() -> None:
    backend = ScriptedBackend(REPLY)
    await backend.start()
    port = backend.port
    await backend.stop()
    with pytest.raises(OSError):
        await raw_request("127.0.0.1", port, b"x")
