"""Active probes against real loopback servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from poise.config.model import HealthCheckConfig
from poise.health.probes import BODY_LIMIT, probe, probe_method, status_expected
from poise.models import Backend
from poise.testing import HttpBackend, RecordedRequest, Response, ScriptedBackend


def backend_for(url: str) -> Backend:
    host, port = url.split("//")[1].rsplit(":", 1)
    return Backend(id=f"{host}:{port}", scheme="http", host=host, port=int(port),
                   authority=f"{host}:{port}")  # fmt: skip


def test_status_ranges() -> None:
    ranges = ((200, 299), (304, 304))
    assert status_expected(204, ranges)
    assert status_expected(304, ranges)
    assert not status_expected(301, ranges)


async def test_seed_probe_is_head_slash_and_200_is_healthy() -> None:
    async with HttpBackend() as b:
        result = await probe(backend_for(b.url), HealthCheckConfig())
        assert result.ok
        assert result.reason == "status 200"
        req = b.requests[-1]
        assert (req.method, req.target) == ("HEAD", "/")
        assert req.header("Host") == b.url.split("//")[1]


async def test_configured_probe_and_unexpected_status() -> None:
    async def handler(req: RecordedRequest) -> Response:
        return Response(status=503 if req.target == "/healthz" else 200)

    async with HttpBackend(handler=handler) as b:
        hc = HealthCheckConfig(method="GET", path="/healthz", host="svc.internal")
        result = await probe(backend_for(b.url), hc)
        assert not result.ok
        assert result.reason == "status 503"
        assert b.requests[-1].header("Host") == "svc.internal"
        assert b.requests[-1].method == "GET"
        ok = await probe(backend_for(b.url), HealthCheckConfig(expected_status=((500, 599),),
                                                               path="/healthz"))  # fmt: skip
        assert ok.ok


async def test_refused_and_timeout_reasons() -> None:
    b = HttpBackend()
    await b.start()
    dead = backend_for(b.url)
    await b.stop()
    refused = await probe(dead, HealthCheckConfig())
    assert (refused.ok, refused.reason) == (False, "connect refused")

    async def slow(_: RecordedRequest) -> Response:
        return Response(delay=5)

    async with HttpBackend(handler=slow) as s:
        result = await probe(backend_for(s.url), HealthCheckConfig(timeout=0.2))
    assert (result.ok, result.reason) == (False, "timeout 0.2s")


async def test_tcp_probe() -> None:
    async with HttpBackend() as b:
        result = await probe(backend_for(b.url), HealthCheckConfig(type="tcp"))
    assert (result.ok, result.reason) == (True, "connected")


async def test_tcp_probe_refused() -> None:
    b = HttpBackend()
    await b.start()
    dead = backend_for(b.url)
    await b.stop()
    result = await probe(dead, HealthCheckConfig(type="tcp"))
    assert (result.ok, result.reason) == (False, "connect refused")


async def test_extra_headers_are_sent_after_the_fixed_ones() -> None:
    async with HttpBackend() as b:
        hc = HealthCheckConfig(headers=(("X-Probe", "1"), ("Authorization", "Bearer t")))
        assert (await probe(backend_for(b.url), hc)).ok
        req = b.requests[-1]
    names = [name.lower() for name, _ in req.headers]
    assert names == ["host", "user-agent", "connection", "x-probe", "authorization"]
    assert req.header("X-Probe") == "1"
    assert req.header("Authorization") == "Bearer t"
    assert req.header("Connection") == "close"
    assert req.header("User-Agent") == "poise-health"


def text(body: bytes) -> HttpBackend:
    async def handler(_: RecordedRequest) -> Response:
        return Response(body=body)

    return HttpBackend(handler=handler)


async def test_body_match_and_mismatch_with_content_length() -> None:
    async with text(b'{"status": "ok", "db": "up"}') as b:
        backend = backend_for(b.url)
        ok = await probe(backend, HealthCheckConfig(body='"db": "up"'))
        assert (ok.ok, ok.reason) == (True, "status 200")
        bad = await probe(backend, HealthCheckConfig(body='"db": "down"'))
        assert (bad.ok, bad.reason) == (False, 'body did not match \'"db": "down"\'')
        anchored = await probe(backend, HealthCheckConfig(body="^ok"))
        assert (anchored.ok, anchored.reason) == (False, "body did not match '^ok'")


async def test_head_becomes_get_only_when_a_body_is_checked() -> None:
    assert probe_method(HealthCheckConfig()) == "HEAD"
    assert probe_method(HealthCheckConfig(body="ok")) == "GET"
    assert probe_method(HealthCheckConfig(method="POST", body="ok")) == "POST"
    async with text(b"ok") as b:
        assert (await probe(backend_for(b.url), HealthCheckConfig(body="ok"))).ok
        assert b.requests[-1].method == "GET"
        assert (await probe(backend_for(b.url), HealthCheckConfig())).ok
        assert b.requests[-1].method == "HEAD"


async def test_body_match_across_chunks() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"sta", b"tus: o", b"k\n"):
            yield part
            await asyncio.sleep(0.01)  # separate writes, so the probe reads several times

    async def handler(_: RecordedRequest) -> Response:
        return Response(body=chunks())

    async with HttpBackend(handler=handler) as b:
        backend = backend_for(b.url)
        ok = await probe(backend, HealthCheckConfig(body="status: ok$", timeout=2))
        assert (ok.ok, ok.reason) == (True, "status 200")
        assert b.requests[-1].version == "1.1"  # so the backend really sent chunked framing
        bad = await probe(backend, HealthCheckConfig(body="status: ko", timeout=2))
        assert (bad.ok, bad.reason) == (False, "body did not match 'status: ko'")


def close_delimited(body: bytes, *, close: bool = True) -> ScriptedBackend:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    return ScriptedBackend(head + body, close_after_reply=close)


async def test_body_match_in_a_close_delimited_body() -> None:
    async with close_delimited(b"all systems go") as s:
        backend = backend_for(s.url)
        ok = await probe(backend, HealthCheckConfig(body="systems go"))
        assert (ok.ok, ok.reason) == (True, "status 200")
        bad = await probe(backend, HealthCheckConfig(body="stop"))
        assert (bad.ok, bad.reason) == (False, "body did not match 'stop'")
        assert s.received[0].startswith(b"GET / HTTP/1.1\r\n")


async def test_only_the_first_64_KiB_are_searched_and_reading_stops_there() -> None:
    filler = b"x" * BODY_LIMIT
    # The server never closes: the probe must stop at the limit, not wait for its timeout.
    async with close_delimited(b"early" + filler + b"late", close=False) as s:
        backend = backend_for(s.url)
        early = await probe(backend, HealthCheckConfig(body="early", timeout=2))
        assert (early.ok, early.reason) == (True, "status 200")
        late = await probe(backend, HealthCheckConfig(body="late", timeout=2))
        assert (late.ok, late.reason) == (False, "body did not match 'late'")
    async with text(filler + b"late") as b:
        late = await probe(backend_for(b.url), HealthCheckConfig(body="late"))
        assert (late.ok, late.reason) == (False, "body did not match 'late'")


async def test_unexpected_status_fails_before_the_body_is_looked_at() -> None:
    async def handler(_: RecordedRequest) -> Response:
        return Response(status=500, body=b"ok")

    async with HttpBackend(handler=handler) as b:
        result = await probe(backend_for(b.url), HealthCheckConfig(body="ok"))
    assert (result.ok, result.reason) == (False, "status 500")


async def test_interim_response_is_skipped() -> None:
    reply = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno"
    )
    async with ScriptedBackend(reply) as s:
        result = await probe(backend_for(s.url), HealthCheckConfig(body="no"))
    assert (result.ok, result.reason) == (False, "status 503")


@pytest.mark.parametrize(
    ("reply", "body", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", None, "not an HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", None, "response head cut short"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nok", "ok", "response body cut short"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok", "ok",
         "response body cut short"),
        (b"", None, "connection closed before a response"),
    ],
)  # fmt: skip
async def test_broken_responses(reply: bytes, body: str | None, reason: str) -> None:
    def script(_received: bytes) -> bytes:
        return reply  # at once, then close (the empty reply closes without a byte)

    async with ScriptedBackend(script, close_after_reply=True) as s:
        result = await probe(backend_for(s.url), HealthCheckConfig(body=body))
    assert (result.ok, result.reason) == (False, reason)


async def test_port_override_for_http_and_tcp() -> None:
    async def handler(_: RecordedRequest) -> Response:
        return Response(status=500)

    # The backend's own port answers 500; the health port answers 200.
    async with HttpBackend(handler=handler) as main, HttpBackend() as health:
        backend = backend_for(main.url)
        assert not (await probe(backend, HealthCheckConfig())).ok
        hc = HealthCheckConfig(port=health.port)
        result = await probe(backend, hc)
        assert (result.ok, result.reason) == (True, "status 200")
        assert len(health.requests) == 1
        assert len(main.requests) == 1  # only the probe without the override
        # Host still names the backend: the port is only where its health is served.
        assert health.requests[0].header("Host") == backend.authority
        assert (await probe(backend, HealthCheckConfig(type="tcp", port=health.port))).ok
    dead = HttpBackend()
    await dead.start()
    dead_port = dead.port
    await dead.stop()
    async with HttpBackend() as live:
        backend = backend_for(live.url)
        tcp = await probe(backend, HealthCheckConfig(type="tcp", port=dead_port))
        assert (tcp.ok, tcp.reason) == (False, "connect refused")


async def test_result_carries_latency_and_wall_clock_time() -> None:
    async with HttpBackend() as b:
        before = time.time()
        result = await probe(backend_for(b.url), HealthCheckConfig())
        after = time.time()
    assert before <= result.at <= after
    assert 0 < result.latency < after - before + 0.01
