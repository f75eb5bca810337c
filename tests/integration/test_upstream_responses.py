"""How poise reads backend responses: partial reads, framing choices, malformed answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from poise.testing import ScriptedBackend
from tests.integration.support import exchange, full, running


class DribbleBackend:
    """A backend that answers every request with ``response`` sent one byte per write."""

    def __init__(self, response: Callable[[bytes], bytes]) -> None:
        self.response = response
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> DribbleBackend:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    for i, byte in enumerate(self.response(head)):
                        writer.write(bytes([byte]))
                        if i % 7 == 0:
                            await writer.drain()
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def fixed(raw: bytes) -> Callable[[bytes], bytes]:
    return lambda _head: raw


@pytest.mark.parametrize(
    ("raw", "body", "te"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nhello world",
            b"hello world",
            None,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"hello world",
            "chunked",
        ),
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            None,
        ),
    ],
)
async def test_responses_read_byte_by_byte(raw: bytes, body: bytes, te: str | None) -> None:
    async with DribbleBackend(fixed(raw)) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            for _ in range(3):  # and the pooled connection is reused correctly
                r = await client.get(url)
                assert r.status_code == 200
                assert r.content == body
                assert r.headers.get("transfer-encoding") == te


async def test_interim_103_forwarded_before_final_response() -> None:
    raw = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    async with ScriptedBackend(raw) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            answer = await exchange(url, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.startswith(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n"
    )
    assert answer.endswith(b"\r\n\r\nok")


async def test_http10_backend_close_delimited_body_rechunked_for_http11_client() -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with ScriptedBackend(raw, close_after_reply=True) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            r = await client.get(url)
            assert r.http_version == "HTTP/1.1"
            assert r.headers["transfer-encoding"] == "chunked"
            assert r.text == "until the end"
            again = await client.get(url)  # the client connection is still good
            assert again.text == "until the end"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nab",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
async def test_malformed_backend_response_gives_502_and_drops_connection(raw: bytes) -> None:
    async with ScriptedBackend(raw) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (server, url), httpx.AsyncClient() as client:
            r = await client.get(url)
            assert r.status_code == 502
            assert r.text == "Bad Gateway\n"
            assert server.ctx is not None
            pool = server.ctx.table.groups["app"].pools[0]
            assert pool.idle == []


async def test_backend_closing_mid_body_truncates_client_connection() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    async with ScriptedBackend(raw, close_after_reply=True) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            answer = await exchange(url, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"Content-Length: 100" in head
    assert body == b"only part"  # and then EOF: never a keep-alive after a short body


async def test_two_responses_for_one_request_second_never_reaches_next_client_request() -> None:
    two = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
    )

    async with ScriptedBackend(two) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            bodies = [(await client.get(url)).text for _ in range(3)]
    assert "second" not in bodies
    assert bodies[0] == "first"
