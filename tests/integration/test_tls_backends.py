"""TLS towards backends: verification, SNI, client certificates, pooled TLS connections,
health probes over TLS. The backends are HttpBackends serving TLS on 127.0.0.1."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from poise.testing import HttpBackend
from tests.integration.support import eventually, exchange, full, running
from tests.tls.certgen import CA
from tests.tls.helpers import server_context

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path)


@pytest.fixture
def other_ca(tmp_path: Path) -> CA:
    (tmp_path / "other").mkdir()
    return CA(tmp_path / "other", "other CA")


def doc(url: str, tls: dict[str, Any] | None, *, health: bool = True) -> dict[str, Any]:
    d = full([url], health=None if health else {"enabled": False})
    if tls is not None:
        d["upstreams"]["app"]["tls"] = tls
    return d


def proxied(backend: HttpBackend) -> list[Any]:
    return [r for r in backend.requests if r.header("user-agent") != "poise-health"]


async def test_verified_backend_and_pooled_tls_connections(ca: CA) -> None:
    pair = ca.issue("backend", ["localhost", "127.0.0.1"])
    async with HttpBackend("b1", ssl_context=server_context(pair)) as backend:
        assert backend.url.startswith("https://127.0.0.1:")
        async with running(doc(backend.url, {"ca": str(ca.path)})) as (server, url):
            health = server.statistics()["health"]["app"]["backends"][backend.url]
            assert health["health"] == "up"  # the probe spoke TLS (HEAD / over TLS)
            raw = await exchange(url, GET * 3 + GET_CLOSE)
            assert raw.count(b"HTTP/1.1 200 OK") == 4
            assert raw.count(b"b1\n") == 4
            pool = server.statistics()["proxy"]["pools"]["app"][0]
            assert pool["connects"] == 1 and pool["reuses"] == 3
            assert len({r.connection_id for r in proxied(backend)}) == 1
            # another client connection reuses the same TLS connection
            raw = await exchange(url, GET_CLOSE)
            assert b"b1\n" in raw
            assert server.statistics()["proxy"]["pools"]["app"][0]["connects"] == 1


async def test_wrong_ca_is_refused_with_502_and_fails_the_probe(ca: CA, other_ca: CA) -> None:
    pair = ca.issue("backend", ["127.0.0.1"])
    async with HttpBackend("b1", ssl_context=server_context(pair)) as backend:
        tls = {"ca": str(other_ca.path)}
        async with running(doc(backend.url, tls, health=False)) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
            assert (
                str(backend.port).encode() not in raw
                and b"127.0.0.1" not in raw.split(b"\r\n\r\n", 1)[1]
            )
        assert proxied(backend) == []
        async with running(doc(backend.url, tls)) as (server, url):
            health = server.statistics()["health"]["app"]["backends"][backend.url]
            assert health["health"] == "down"
            assert health["reason"].startswith("tls: "), health["reason"]
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 503 ")
        # the system store does not know our CA either
        async with running(doc(backend.url, None, health=False)) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 502 ")
        async with running(doc(backend.url, {"verify": False}, health=False)) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 200 ")


async def test_server_name_is_sent_and_verified(ca: CA) -> None:
    pair = ca.issue("backend", ["backend.internal"])
    names: list[str | None] = []
    ctx = server_context(pair)
    ctx.sni_callback = lambda obj, name, c: names.append(name)
    async with HttpBackend("b1", ssl_context=ctx) as backend:
        # the certificate does not name 127.0.0.1: refused without server_name
        async with running(doc(backend.url, {"ca": str(ca.path)}, health=False)) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 502 ")
        tls = {"ca": str(ca.path), "server_name": "backend.internal"}
        async with running(doc(backend.url, tls)) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 200 ")
        assert "backend.internal" in names


async def test_client_certificate_towards_the_backend(ca: CA) -> None:
    pair = ca.issue("backend", ["127.0.0.1"])
    client = ca.issue("poise-client", cn="poise", client=True)
    seen: list[Any] = []

    async def handler(request: Any) -> Any:
        from poise.testing import Response

        return Response(body=b"ok\n")

    ctx = server_context(pair, client_ca=ca)
    async with HttpBackend("b1", handler, ssl_context=ctx) as backend:
        base = {"ca": str(ca.path)}
        async with running(doc(backend.url, base, health=False)) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 502 ")
        tls = {**base, "cert": str(client.cert), "key": str(client.key)}
        async with running(doc(backend.url, tls)) as (server, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 200 "), raw
            assert server.statistics()["health"]["app"]["backends"][backend.url]["health"] == "up"
        seen.append(len(proxied(backend)))
    assert seen == [1]


async def test_tls_backend_going_away_is_noticed(ca: CA) -> None:
    pair = ca.issue("backend", ["127.0.0.1"])
    backend = HttpBackend("b1", ssl_context=server_context(pair))
    await backend.start()
    tls = {"ca": str(ca.path)}
    health = {"interval": "100ms", "timeout": "100ms"}
    d = full([backend.url], health=health)
    d["upstreams"]["app"]["tls"] = tls
    async with running(d) as (server, url):
        await backend.stop()

        def down() -> bool:
            h = server.statistics()["health"]["app"]["backends"][backend.url]
            return bool(h["health"] == "down")

        await eventually(down)
        raw = await exchange(url, GET_CLOSE)
        assert raw.startswith(b"HTTP/1.1 503 ")
        await backend.start()

        def up() -> bool:
            h = server.statistics()["health"]["app"]["backends"][backend.url]
            return bool(h["health"] == "up")

        await eventually(up)
        raw = await exchange(url, GET_CLOSE)
        assert raw.startswith(b"HTTP/1.1 200 ")
    await backend.stop()


def test_ssl_module_is_the_one_poise_uses() -> None:
    # the client context poise builds trusts only the given bundle
    from poise.config import UpstreamTlsConfig
    from poise.tls.contexts import client_context

    ctx = client_context(UpstreamTlsConfig())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_websocket_over_tls_on_both_sides(ca: CA) -> None:
    """A 101 turns an HTTPS client connection and a TLS backend connection into a tunnel."""
    import asyncio

    from poise.testing import RecordedRequest, Response
    from tests.tls.helpers import client_context

    async def accept(req: RecordedRequest) -> Response:
        return Response(status=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])

    pair = ca.issue("backend", ["127.0.0.1"])
    front = ca.issue("front", ["ws.test"])
    async with HttpBackend("b1", accept, ssl_context=server_context(pair)) as backend:
        d = doc(backend.url, {"ca": str(ca.path)}, health=False)
        d["listeners"][0]["tls"] = {"cert": str(front.cert), "key": str(front.key)}
        async with running(d) as (server, _):
            host, port = server.addresses["web"]
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_context(ca), server_hostname="ws.test"
            )
            writer.write(
                b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\nearly|"
            )
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                assert await reader.readexactly(6) == b"early|"
                for i in range(3):
                    frame = b"frame %d|" % i
                    writer.write(frame)
                    assert await reader.readexactly(len(frame)) == frame
            writer.close()
            assert server.ctx is not None
            await eventually(lambda: not server.ctx.tunnels)  # type: ignore[union-attr]


async def test_https_backends_from_a_file_speak_tls(ca: CA, tmp_path: Path) -> None:
    """Backends discovered at run time: with a tls section they are verified with it; without
    one, a group meeting its first https:// backend gets the defaults (the system store)."""
    pair = ca.issue("backend", ["127.0.0.1"])
    async with HttpBackend("b1", ssl_context=server_context(pair)) as backend:
        listing = tmp_path / "backends.txt"
        listing.write_text(backend.url + "\n")
        d = full([], health={"enabled": False})
        d["upstreams"]["app"] = {"file": str(listing), "health_check": {"enabled": False},
                                 "tls": {"ca": str(ca.path)}}  # fmt: skip
        async with running(d) as (_, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
        del d["upstreams"]["app"]["tls"]
        async with running(d) as (server, url):
            raw = await exchange(url, GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 502 "), raw[:100]  # our CA is not in the store
            assert server.ctx is not None and "app" in server.ctx.upstream_tls
        assert len(proxied(backend)) == 1
