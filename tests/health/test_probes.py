"""Active probes against real loopback servers."""

from __future__ import annotations

import asyncio
import random

from poise.config.model import HealthCheckConfig
from poise.health.checker import GroupChecker
from poise.health.probes import probe, status_expected
from poise.models import Backend
from poise.testing import HttpBackend, RecordedRequest, Response


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


async def test_checker_publishes_on_first_round_and_on_change_only() -> None:
    published: list[tuple[str, tuple[bool, ...]]] = []
    async with HttpBackend() as a, HttpBackend() as b:
        backends = (backend_for(a.url), backend_for(b.url))
        checker = GroupChecker(
            "g", backends, HealthCheckConfig(), lambda g, up: published.append((g, up)),
            random.Random(0),
        )  # fmt: skip
        await checker.check_once()
        await checker.check_once()
        assert published == [("g", (True, True))]
        await b.stop()
        await checker.check_once()
        assert published[-1] == ("g", (True, False))
        assert checker.states[1].reason == "connect refused"
        task = asyncio.create_task(checker.run())
        await asyncio.sleep(0)
        task.cancel()
