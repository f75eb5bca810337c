"""Request limits (431/414/413/503), path policy, slow bodies, and who gets to say
X-Forwarded-For / Forwarded / Via."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from poise.testing import HttpBackend, ScriptedBackend
from tests.integration.support import address, exchange, full, running

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def doc_for(url: str, **top: Any) -> dict[str, Any]:
    return full([url], health={"enabled": False}, **top)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 70 * 1024 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 16 * 1024 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413),
    ],
)
async def test_limits_refuse_and_backend_sees_nothing(request_bytes: bytes, status: int) -> None:
    async with ScriptedBackend(OK) as backend:
        doc = doc_for(backend.url, limits={"max_body_size": 1000})
        async with running(doc) as (_, url):
            answer = await exchange(url, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
    assert b"Connection: close" in answer
    assert b"".join(backend.received) == b""


async def test_endless_header_line_is_cut_off_without_buffering_it() -> None:
    async with ScriptedBackend(OK) as backend:
        doc = doc_for(backend.url, limits={"max_header_bytes": 4096})
        async with running(doc) as (server, url):
            host, port = address(url)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
            sent = 0
            try:
                while sent < 1024 * 1024:
                    writer.write(b"x" * 8192)
                    await writer.drain()
                    sent += 8192
            except ConnectionError:
                pass
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert server.ctx is not None
            assert server.ctx.stats.bad_requests == 1
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert backend.received == []


async def test_chunked_body_over_the_limit_is_cut_with_413() -> None:
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, limits={"max_body_size": 10})
        async with running(doc) as (_, url):
            answer = await exchange(
                url,
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n",
            )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert all(r.body != b"1234567812345678" for r in backend.requests)


async def test_body_within_limit_passes() -> None:
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, limits={"max_body_size": 10})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            r = await client.post(url, content=b"0123456789")
    assert r.status_code == 200
    assert backend.requests[-1].body == b"0123456789"


async def test_stalled_request_body_gets_408() -> None:
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, timeouts={"client_body": "300ms"})
        async with running(doc) as (_, url):
            host, port = address(url)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_connections_over_the_limit_are_refused_with_503() -> None:
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, limits={"max_connections": 2})
        async with running(doc) as (server, url):
            host, port = address(url)
            held = [await asyncio.open_connection(host, port) for _ in range(2)]
            assert server.ctx is not None
            answer = await exchange(url, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert answer.endswith(b"Too many connections\n")
            for _, w in held:
                w.close()
            # once the held connections are gone, new ones are served again
            for _ in range(100):
                if len(server.ctx.clients) == 0:
                    break
                await asyncio.sleep(0.02)
            ok = await exchange(url, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 ")
            assert server.ctx.stats.connections_refused == 1


SPOOF = (
    b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n"
    b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n"
    b"Forwarded: for=1.2.3.4\r\n\r\n"
)


async def test_untrusted_forwarding_headers_are_replaced() -> None:
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, proxy={"forwarded": True, "via": True})
        async with running(doc) as (_, url):
            answer = await exchange(url, SPOOF)
    assert b"\r\nVia: 1.1 poise\r\n" in answer
    req = backend.requests[-1]
    assert req.header("X-Forwarded-For") == "127.0.0.1"
    assert req.header("X-Forwarded-Proto") == "http"
    assert req.header("X-Forwarded-Host") == "site.test"
    assert req.header("Forwarded") == 'for=127.0.0.1;proto=http;host="site.test"'
    assert req.header("Via") == "1.1 poise"
    assert [k.lower() for k, _ in req.headers].count("x-forwarded-for") == 1


async def test_trusted_proxy_chain_is_appended_to() -> None:
    async with HttpBackend() as backend:
        proxy = {"trusted_proxies": ["127.0.0.0/8"], "forwarded": True}
        async with running(doc_for(backend.url, proxy=proxy)) as (_, url):
            await exchange(url, SPOOF)
    req = backend.requests[-1]
    assert req.header("X-Forwarded-For") == "1.2.3.4, 127.0.0.1"
    assert req.header("X-Forwarded-Proto") == "https"
    assert req.header("X-Forwarded-Host") == "evil.test"
    assert req.header("Forwarded") == 'for=1.2.3.4, for=127.0.0.1;proto=http;host="site.test"'


async def test_x_forwarded_off_passes_client_values_through() -> None:
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, proxy={"x_forwarded": False})
        async with running(doc) as (_, url):
            await exchange(url, SPOOF)
    req = backend.requests[-1]
    assert req.header("X-Forwarded-For") == "1.2.3.4"
    assert req.header("Forwarded") == "for=1.2.3.4"


async def test_trickling_request_body_is_cut_below_the_minimum_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from poise.l7 import context

    monkeypatch.setattr(context, "BODY_RATE_GRACE", 0.5)
    async with HttpBackend() as backend:
        doc = doc_for(backend.url, limits={"min_body_rate": 1000})
        async with running(doc) as (_, url):
            host, port = address(url)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")

            async def trickle() -> None:
                try:
                    for _ in range(100):  # one byte every 0.1 s: 10 B/s, under the 1000 B/s
                        writer.write(b"x")
                        await writer.drain()
                        await asyncio.sleep(0.1)
                except ConnectionError:
                    pass

            task = asyncio.create_task(trickle())
            async with asyncio.timeout(10):
                answer = await reader.read()
            task.cancel()
            writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
