"""Upgrade / WebSocket: a tunnel only after a real 101; a refused upgrade stays HTTP."""

from __future__ import annotations

import asyncio

import pytest

from poise.testing import HttpBackend, RecordedRequest, Response
from tests.integration.support import address, exchange, full, running

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")

HANDSHAKE = (
    b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def accept(req: RecordedRequest) -> Response:
    if req.header("Upgrade") == "websocket":
        return Response(status=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])
    return Response(body=b"plain")


async def refuse(req: RecordedRequest) -> Response:
    return Response(status=426 if req.target == "/chat" else 200, body=req.target.encode())


async def test_101_turns_the_connection_into_a_tunnel_both_ways() -> None:
    async with (
        HttpBackend(handler=accept) as backend,
        running(full([backend.url], health={"enabled": False})) as (server, url),
    ):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(HANDSHAKE + b"early frame|")  # bytes before the 101 are held, then sent
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"\r\nUpgrade: websocket\r\n" in head
            assert b"\r\nConnection: Upgrade\r\n" in head
            assert await reader.readexactly(12) == b"early frame|"
            for i in range(5):
                frame = b"frame %d|" % i
                writer.write(frame)
                assert await reader.readexactly(len(frame)) == frame
        assert server.ctx is not None
        assert len(server.ctx.tunnels) == 1
        writer.close()
        for _ in range(200):
            if not server.ctx.tunnels:
                break
            await asyncio.sleep(0.01)
        assert not server.ctx.tunnels
    req = backend.requests[0]
    assert req.header("Upgrade") == "websocket"
    assert req.header("Connection") == "Upgrade"
    assert req.header("Sec-WebSocket-Key") == "dGhlIHNhbXBsZSBub25jZQ=="


async def test_refused_upgrade_keeps_parsing_http() -> None:
    async with (
        HttpBackend(handler=refuse) as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url, HANDSHAKE + b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer.endswith(b"/next")
    assert [r.target for r in backend.requests] == ["/chat", "/next"]


async def test_tunnel_closed_after_idle_timeout() -> None:
    async with (
        HttpBackend(handler=accept) as backend,
        running(
            full([backend.url], health={"enabled": False}, timeouts={"tunnel_idle": "300ms"})
        ) as (server, url),
    ):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(HANDSHAKE)
        async with asyncio.timeout(10):
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.read() == b""  # closed by the idle timeout
        writer.close()
        assert server.ctx is not None
        assert not server.ctx.tunnels


async def test_upgrade_on_a_post_is_not_forwarded() -> None:
    async with (
        HttpBackend(handler=accept) as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(
            url,
            b"POST /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n"
            b"Content-Length: 0\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert backend.requests[-1].header("Upgrade") is None


async def test_101_without_an_upgrade_request_is_a_bad_gateway() -> None:
    async def rogue(_: RecordedRequest) -> Response:
        return Response(status=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])

    async with (
        HttpBackend(handler=rogue) as backend,
        running(full([backend.url], health={"enabled": False})) as (_, url),
    ):
        answer = await exchange(url, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 ")
