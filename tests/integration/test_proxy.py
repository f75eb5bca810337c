"""End-to-end behaviour of the HTTP proxy: real sockets on 127.0.0.1, real backends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from poise.testing import HttpBackend, RecordedRequest, Response, ScriptedBackend, echo_handler
from tests.integration.support import address, eventually, exchange, full, running, seed

# every case with the C hub and with the loop's own server (tests/wire/helpers.py)
pytestmark = pytest.mark.usefixtures("wire_hub")


@pytest.fixture
async def five() -> AsyncIterator[list[HttpBackend]]:
    backends = [HttpBackend(name=f"b{i}") for i in range(5)]
    for b in backends:
        await b.start()
    yield backends
    for b in backends:
        await b.stop()


def _proxied(b: HttpBackend) -> list[RecordedRequest]:
    """Requests that came through the proxy (health checks are HEAD / with no XFF)."""
    return [r for r in b.requests if r.header("X-Forwarded-For") is not None]


async def test_tests_run_on_uvloop() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_seed_config_rotates_over_all_backends(five: list[HttpBackend]) -> None:
    async with running(seed([b.url for b in five])) as (_, url), httpx.AsyncClient() as client:
        bodies = [(await client.get(url + "/")).text for _ in range(50)]
    counts = Counter(bodies)
    assert counts == {f"b{i}\n": 10 for i in range(5)}
    # strict rotation: every window of 5 consecutive responses names each backend once
    assert all(len(set(bodies[i : i + 5])) == 5 for i in range(0, 45))


async def test_dead_backend_skipped_then_back_after_recovery(five: list[HttpBackend]) -> None:
    # The seed format's probe timeout is its interval (at most 1 s) and one failed probe marks
    # a backend down, so the interval must outlast a stall of this 2-core box: with 100 ms,
    # a stall of the shared loop (backends and proxy run in one) once marked all five down.
    doc = seed([b.url for b in five], interval="500ms")
    async with running(doc) as (server, url), httpx.AsyncClient() as client:
        victim = five[2]
        await victim.stop()
        checker = server.membership.checkers[0]
        await eventually(lambda: [s.up for s in checker.states] == [True, True, False, True, True])
        bodies = {(await client.get(url)).text for _ in range(20)}
        assert bodies == {"b0\n", "b1\n", "b3\n", "b4\n"}

        await victim.start()
        await eventually(lambda: checker.states[2].up)
        bodies = {(await client.get(url)).text for _ in range(20)}
        assert "b2\n" in bodies
        assert checker.states[2].reason == "status 200"


async def test_all_dead_gives_503_no_healthy_server(five: list[HttpBackend]) -> None:
    doc = seed([b.url for b in five], interval="100ms")
    async with running(doc) as (server, url), httpx.AsyncClient() as client:
        for b in five:
            await b.stop()
        await eventually(lambda: not any(s.up for s in server.membership.checkers[0].states))
        r = await client.get(url + "/anything")
        assert r.status_code == 503
        assert r.text == "No healthy server available\n"
        # the connection stays usable: a bodiless request was answered completely
        r2 = await client.get(url)
        assert r2.status_code == 503


async def test_first_check_runs_before_traffic() -> None:
    async with HttpBackend(name="alive") as alive:
        dead = HttpBackend(name="dead")
        await dead.start()
        dead_url = dead.url
        await dead.stop()
        doc = seed([alive.url, dead_url], interval="10s")
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            bodies = [(await client.get(url)).text for _ in range(6)]
        assert bodies == ["alive\n"] * 6


async def test_connect_failure_goes_to_next_backend() -> None:
    # Health checks off: the dead backend still counts as healthy; the proxy must try the
    # next one because nothing was sent to the first.
    async with HttpBackend(name="alive") as alive:
        dead = HttpBackend()
        await dead.start()
        dead_url = dead.url
        await dead.stop()
        doc = full([dead_url, alive.url], health={"enabled": False})
        async with running(doc) as (server, url), httpx.AsyncClient() as client:
            for _ in range(4):
                r = await client.get(url)
                assert (r.status_code, r.text) == (200, "alive\n")
            assert server.ctx is not None
            assert server.ctx.stats.upstream_connect_errors >= 2


async def test_every_backend_refusing_gives_503() -> None:
    """Nothing could be sent anywhere: no server could take the request (issue: it was 502)."""
    dead = HttpBackend()
    await dead.start()
    dead_url = dead.url
    await dead.stop()
    doc = full([dead_url], health={"enabled": False})
    async with running(doc) as (_, url), httpx.AsyncClient() as client:
        r = await client.get(url)
    assert (r.status_code, r.text) == (503, "No healthy server available\n")
    assert dead_url.split("//")[1] not in r.text  # no backend address in error bodies


async def test_upstream_response_timeout_gives_504() -> None:
    async def slow(_: RecordedRequest) -> Response:
        return Response(body=b"late", delay=3.0)

    async with HttpBackend(handler=slow) as backend:
        doc = full(
            [backend.url],
            health={"enabled": False},
            timeouts={"upstream_response": "300ms"},
        )
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            r = await client.get(url, timeout=10)
    assert r.status_code == 504


async def test_keep_alive_reuses_backend_connections() -> None:
    async with HttpBackend(name="one") as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            for _ in range(100):
                assert (await client.get(url)).status_code == 200
        assert len(backend.requests) == 100
        assert backend.connections_accepted == 1


async def test_large_bodies_stream_both_ways_byte_exact() -> None:
    payload = os.urandom(24 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    async def handler(req: RecordedRequest) -> Response:
        if req.target == "/download":
            return Response(body=chunks())
        return await echo_handler(req)

    async with HttpBackend(handler=handler) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient(timeout=60) as client:
            up = await client.post(url + "/upload", content=payload)
            assert up.status_code == 200
            assert hashlib.sha256(up.content).digest() == hashlib.sha256(payload).digest()

            async def gen() -> AsyncIterator[bytes]:
                for i in range(0, len(payload), 300_000):
                    yield payload[i : i + 300_000]

            chunked_up = await client.post(url + "/upload", content=gen())
            assert chunked_up.content == payload
            assert backend.requests[-1].body == payload

            down = await client.get(url + "/download")
            assert down.headers.get("transfer-encoding") == "chunked"
            assert down.content == payload


async def test_pipelined_requests_answered_in_order() -> None:
    async def handler(req: RecordedRequest) -> Response:
        delay = 0.3 if req.target == "/1" else 0.0
        return Response(body=req.target.encode(), delay=delay)

    async with HttpBackend(handler=handler) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            raw = (
                b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            answer = await exchange(url, raw)
    bodies = [part.split(b"\r\n\r\n", 1)[1][:2] for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"/1", b"/2", b"/3"]
    assert [r.body for r in backend.requests if r.target == "/2"] == [b"hello"]


async def test_request_head_rebuilt_hop_by_hop_removed_forwarded_added() -> None:
    async with HttpBackend(handler=echo_handler) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            raw = (
                b"GET /h?q=1 HTTP/1.1\r\nHost: example.test\r\n"
                b"Connection: keep-alive, X-Foo, close, X-Forwarded-For\r\n"
                b"X-Foo: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                b"Upgrade: h2c\r\nTE: trailers\r\nX-Keep: yes\r\n"
                b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n\r\n"
            )
            answer = await exchange(url, raw)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close\r\n" in answer
    req = backend.requests[-1]
    names = [k.lower() for k, _ in req.headers]
    for gone in ("x-foo", "keep-alive", "proxy-connection", "upgrade", "te", "connection"):
        assert gone not in names
    assert req.header("X-Keep") == "yes"
    assert req.header("X-Forwarded-For") == "127.0.0.1"
    assert req.header("X-Forwarded-Proto") == "http"
    assert req.header("X-Forwarded-Host") == "example.test"
    assert req.header("Host") == "example.test"
    assert names.count("x-forwarded-for") == 1
    assert req.target == "/h?q=1"
    assert req.version == "1.1"


async def test_response_hop_by_hop_removed_and_seed_server_header_optional() -> None:
    async def handler(_: RecordedRequest) -> Response:
        return Response(
            headers=[("Connection", "X-Secret"), ("X-Secret", "s"), ("Keep-Alive", "timeout=9")],
            body=b"ok",
        )

    async with HttpBackend(handler=handler) as backend:
        doc = full([backend.url], health={"enabled": False}, proxy={"x_forwarded_server": True})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            r = await client.get(url)
    assert r.text == "ok"
    assert "x-secret" not in r.headers
    assert "keep-alive" not in r.headers
    assert r.headers["x-forwarded-server"] == backend.url.split("//")[1]


async def test_cl_and_te_together_rejected_and_backend_sees_nothing() -> None:
    async with ScriptedBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            answer = await exchange(
                url,
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1") == 1
    assert b"".join(backend.received) == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ],
)
async def test_framing_doubts_rejected_whole_and_byte_by_byte(
    request_bytes: bytes, status: int
) -> None:
    async with ScriptedBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            whole = await exchange(url, request_bytes)
            split = await exchange(url, request_bytes, bytewise=True)
    for answer in (whole, split):
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:60]
        assert b"Connection: close" in answer
    assert b"".join(backend.received) == b""


async def test_valid_request_fed_byte_by_byte_is_proxied() -> None:
    async with HttpBackend(handler=echo_handler) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            data = (
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n"
                b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
            )
            answer = await exchange(url, data, bytewise=True)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nabcde")
    assert backend.requests[-1].body == b"abcde"
    assert backend.requests[-1].trailers == []  # trailers are not forwarded


async def test_head_response_has_no_body_and_connection_stays_usable() -> None:
    async def handler(req: RecordedRequest) -> Response:
        return Response(
            headers=[("Content-Length", "20000")],
            body=b"" if req.method == "HEAD" else b"x" * 20000,
        )

    async with HttpBackend(handler=handler) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            h = await client.head(url)
            assert h.status_code == 200
            assert h.headers["content-length"] == "20000"
            g = await client.get(url)
            assert len(g.content) == 20000
        assert backend.connections_accepted == 1


async def test_backend_stray_bytes_after_204_do_not_reach_next_response() -> None:
    def script(received: bytes) -> bytes | None:
        if received.count(b"\r\n\r\n") == 1:
            return (
                b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
            )
        return None

    async with ScriptedBackend(script) as bad, HttpBackend(name="good") as good:
        doc = full([bad.url, good.url], health={"enabled": False})
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            statuses = [(await client.get(url)).status_code for _ in range(4)]
            texts = {(await client.get(url)).text for _ in range(4)}
    assert 204 in statuses
    assert "evil!" not in texts


async def test_absolute_form_and_host_routing() -> None:
    async with HttpBackend(name="api") as api, HttpBackend(name="web") as web:
        doc = {
            "listeners": [
                {
                    "name": "main",
                    "listen": "127.0.0.1:0",
                    "routes": [
                        {"host": "api.test", "upstream": "api"},
                        {"path": "/static", "upstream": "web"},
                    ],
                }
            ],
            "upstreams": {
                "api": {"backends": [api.url], "health_check": {"enabled": False}},
                "web": {"backends": [web.url], "health_check": {"enabled": False}},
            },
        }
        async with running(doc) as (_, url), httpx.AsyncClient() as client:
            assert (await client.get(url, headers={"Host": "API.test."})).text == "api\n"
            assert (await client.get(url + "/static/x.css")).text == "web\n"
            assert (await client.get(url + "/staticky")).status_code == 404
            answer = await exchange(
                url,
                b"GET http://api.test/abs?x=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
            )
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert api.requests[-1].target == "/abs?x=1"
        assert api.requests[-1].header("Host") == "api.test"


async def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    async def slow(req: RecordedRequest) -> Response:
        return Response(body=b"done", delay=0.5)

    async with HttpBackend(handler=slow) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (server, url):
            async with httpx.AsyncClient(timeout=10) as client:
                requests = [asyncio.create_task(client.get(url)) for _ in range(20)]
                await eventually(lambda: len(backend.requests) == 20)
                server.stop()
                responses = await asyncio.gather(*requests)
            assert [r.text for r in responses] == ["done"] * 20
            host, port = address(url)
            await eventually(lambda: not server.listeners[0].is_serving())
            with pytest.raises(OSError):
                await asyncio.open_connection(host, port)


async def test_http10_client_gets_close_delimited_body_from_chunked_backend() -> None:
    async def chunky(_: RecordedRequest) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            yield b"hello "
            yield b"world"

        return Response(body=gen())

    async with HttpBackend(handler=chunky) as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            answer = await exchange(url, b"GET / HTTP/1.0\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower()
    assert body == b"hello world"


async def test_error_bodies_are_fixed_text() -> None:
    async with HttpBackend() as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (_, url):
            answer = await exchange(url, b"GET /<script> HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"script" not in answer
    assert answer.endswith(b"\r\n\r\nBad Request\n")


async def test_statistics_count_requests() -> None:
    async with HttpBackend() as backend:
        doc = full([backend.url], health={"enabled": False})
        async with running(doc) as (server, url), httpx.AsyncClient() as client:
            for _ in range(3):
                await client.get(url)
            stats = server.statistics()
    assert stats["proxy"]["stats"]["requests"] == 3
    assert stats["proxy"]["stats"]["responses"] == 3
    assert json.dumps(stats)  # serialisable for the admin API
