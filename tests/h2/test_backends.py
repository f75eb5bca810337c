"""HTTP/2 backends (upstream ``protocol: h2``): HTTP/1.1 and HTTP/2 clients in front, a
small h2 server behind (tests/h2/support.py), h2c and TLS with ALPN h2; multiplexing, a
backend's GOAWAY and refused streams. Both engines (``h2_engine``)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from poise.grpc import parse_timeout
from tests.h2.support import Answer, H2Client, H2Server, Seen
from tests.integration.support import address, eventually, exchange, running
from tests.tls.certgen import CA

pytestmark = pytest.mark.usefixtures("h2_engine")


def doc(urls: list[str], **up: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app", "http2": True}],
        "upstreams": {"app": {"protocol": "h2", "backends": urls,
                              "health_check": {"type": "tcp"}, **up}},
    }  # fmt: skip


async def http1(url: str, request: bytes) -> bytes:
    return await exchange(url, request)


async def test_http1_clients_reach_an_h2c_backend() -> None:
    def handler(seen: Seen) -> Answer:
        path = seen.header(b":path")
        if path == b"/chunks":  # no length: chunked towards HTTP/1.1
            return Answer(headers=[(b"x-b", b"1")], body=[b"ab", b"cd", b"ef"])
        if path == b"/empty":
            return Answer(status=204)
        return Answer(headers=[(b"content-length", str(len(seen.body)).encode())],
                      body=[seen.body or b"-"] if seen.body else [b"-"])  # fmt: skip

    async with H2Server(handler) as backend, running(doc([backend.url])) as (_, url):
        reply = await http1(
            url, b"GET /chunks HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"\r\nTransfer-Encoding: chunked" in head
        assert b"\r\nx-b: 1" in head
        assert body == b"2\r\nab\r\n2\r\ncd\r\n2\r\nef\r\n0\r\n\r\n"
        reply = await http1(
            url,
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 200")
        assert reply.endswith(b"\r\n\r\nabcde")
        reply = await http1(
            url, b"GET /empty HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 204")
    by_path = {s.header(b":path"): s for s in backend.seen}
    up = by_path[b"/up"]
    assert up.body == b"abcde"
    assert up.header(b":authority") == b"a.test"
    assert up.header(b":method") == b"POST"
    assert up.header(b"x-forwarded-for") == b"127.0.0.1"
    assert up.header(b"transfer-encoding") is None  # connection-specific: never on HTTP/2
    assert up.header(b"connection") is None


async def test_many_requests_share_one_backend_connection() -> None:
    async with H2Server() as backend, running(doc([backend.url])) as (server, _):
        client = await H2Client.connect(*server.addresses["web"])
        try:
            replies = await asyncio.gather(*(client.request(f"/r/{i}") for i in range(40)))
        finally:
            await client.close()
    assert all(r.status == 200 for r in replies)
    assert len(backend.seen) == 40
    assert {s.connection for s in backend.seen} == {backend.seen[0].connection}  # one


async def test_a_full_connection_makes_a_new_one_and_the_backends_limit_holds() -> None:
    """The backend allows 5 streams per connection: 5 requests held there fill the first
    connection; the next 5 go on a second; none exceeds 5 (h2 would refuse the sixth)."""

    def handler(seen: Seen) -> Answer:
        return Answer(body=[b"ok"], delay=0.5)

    async with (
        H2Server(handler, max_streams=5) as backend,
        running(doc([backend.url])) as (server, _),
    ):
        client = await H2Client.connect(*server.addresses["web"])
        try:
            first = [client.start(f"/a/{i}") for i in range(5)]
            await eventually(lambda: len(backend.seen) == 5)
            second = [client.start(f"/b/{i}") for i in range(5)]
            for sid in first + second:
                await asyncio.wait_for(client.replies[sid].done.wait(), 10)
            early = [client.start(f"/c/{i}") for i in range(12)]  # on a connection still new
            for sid in early:
                await asyncio.wait_for(client.replies[sid].done.wait(), 10)
        finally:
            await client.close()
        assert all(r.status == 200 for r in client.replies.values())
    used = {s.connection for s in backend.seen if s.header(b":path").startswith(b"/a/")}
    used_b = {s.connection for s in backend.seen if s.header(b":path").startswith(b"/b/")}
    assert used.isdisjoint(used_b)  # the second five went on another connection
    assert max(backend.most_open.values()) <= 5


async def test_trailers_reach_http2_clients() -> None:
    def handler(seen: Seen) -> Answer:
        return Answer(body=[b"data"], trailers=[(b"x-checksum", b"abc")])

    async with H2Server(handler) as backend, running(doc([backend.url])) as (server, _):
        client = await H2Client.connect(*server.addresses["web"])
        try:
            reply = await client.request("/t")
            trailers = client.trailers.get(1)
        finally:
            await client.close()
    assert (reply.status, bytes(reply.body)) == (200, b"data")
    assert trailers == [(b"x-checksum", b"abc")]


async def test_a_backends_goaway_loses_no_request() -> None:
    """The backend takes 3 requests per connection, then says GOAWAY: the rest go on a new
    connection; no client request fails."""
    async with (
        H2Server(goaway_after=3) as backend,
        running(doc([backend.url])) as (_, url),
    ):
        for i in range(10):
            reply = await http1(
                url, b"GET /g/%d HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n" % i
            )
            assert reply.startswith(b"HTTP/1.1 200"), reply
    assert len(backend.seen) == 10
    assert len({s.connection for s in backend.seen}) >= 4  # 3 requests per connection


async def test_a_refused_stream_goes_again() -> None:
    refused: list[bytes] = []

    def handler(seen: Seen) -> Answer:
        path = seen.header(b":path") or b""
        if path not in refused:
            refused.append(path)
            return Answer(refuse=True)
        return Answer(body=[b"second time"])

    async with H2Server(handler) as backend, running(doc([backend.url])) as (_, url):
        reply = await http1(url, b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"\r\n\r\nb\r\nsecond time\r\n0\r\n\r\n")
    assert len(backend.seen) == 2


async def test_an_h2_backend_over_tls(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    pair = ca.issue("backend", ["127.0.0.1"])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pair.cert, pair.key)
    async with H2Server(tls=tls) as backend:
        d = doc([backend.url], tls={"ca": str(ca.path)})
        async with running(d) as (_, url):
            reply = await http1(
                url, b"GET /s HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            )
    assert reply.startswith(b"HTTP/1.1 200")
    assert backend.seen[0].header(b":scheme") == b"https"


async def test_an_unreachable_h2_backend_is_a_503() -> None:
    async with H2Server() as backend:
        url = backend.url
    async with running(doc([url])) as (_, front):
        reply = await http1(front, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503")
    assert reply.endswith(b"No healthy server available\n")
    assert address(front)


async def test_an_idle_backend_connection_closes_after_the_pools_idle_timeout() -> None:
    async with (
        H2Server() as backend,
        running(doc([backend.url], pool={"idle_timeout": "1s"})) as (_, url),
    ):
        reply = await http1(url, b"GET /i HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        assert backend.writers  # the HTTP/2 connection is kept for the next request
        await eventually(lambda: not backend.writers)  # then closed, idle for 1 s


async def test_grpc_timeout_goes_on_as_the_time_left() -> None:
    async with (
        H2Server() as backend,
        running(doc([backend.url], protocol="grpc", health_check={"type": "tcp"})) as (s, _),
    ):
        client = await H2Client.connect(*s.addresses["web"])
        try:
            reply = await client.request(
                "/svc/Call", method="POST",
                headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers"),
                         (b"grpc-timeout", b"10S")],
                body=b"\x00\x00\x00\x00\x00",
            )  # fmt: skip
        finally:
            await client.close()
    assert reply.status == 200
    sent = backend.seen[0].header(b"grpc-timeout")
    assert sent is not None and sent != b"10S"
    left = parse_timeout(sent.decode())
    assert left is not None and 5 < left <= 10
