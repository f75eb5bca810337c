"""Live routing from the service registry: instances flow into the routing table as they
register, leave on deregister, TTL expiry or a critical status; in-flight requests finish."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from poise.registry import CRITICAL, PASSING, Instance
from poise.server import Server
from poise.testing import HttpBackend, RecordedRequest, Response
from tests.integration.support import eventually, running

pytestmark = pytest.mark.timeout(60)


def service_doc(health: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    up: dict[str, Any] = {"service": "users", **upstream}
    up["health_check"] = health if health is not None else {"enabled": False}
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": up},
        "registry": {"store": "memory", "listen": None},
    }


def instance(backend: HttpBackend, iid: str, **kw: Any) -> Instance:
    host, port = backend.url.split("//")[1].rsplit(":", 1)
    return Instance("users", iid, host, int(port), **kw)


def store(server: Server) -> Any:
    assert server.registry is not None
    return server.registry.store


async def served_by(client: httpx.AsyncClient, url: str, n: int) -> list[str]:
    return [(await client.get(url + f"/r{i}")).text for i in range(n)]


async def test_no_instances_is_503_then_a_registration_is_routed_at_once() -> None:
    async with HttpBackend("a") as a, running(service_doc()) as (server, url):
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/")
            assert (r.status_code, r.text) == (503, "No healthy server available\n")
            t0 = time.monotonic()
            await store(server).register(instance(a, "a-1"))

            async def routed() -> bool:
                return (await client.get(url + "/")).status_code == 200

            while not await routed():
                assert time.monotonic() - t0 < 5, "a registered instance was not routed to"
                await asyncio.sleep(0.005)
        assert a.requests, "the request reached the registered instance"


async def test_instances_come_and_go() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(service_doc()) as (server, url),
        httpx.AsyncClient() as client,
    ):
        reg = store(server)
        await reg.register(instance(a, "a-1"))
        await reg.register(instance(b, "b-1"))
        await eventually(lambda: len(server.table.groups["app"].backends) == 2)
        assert sorted(set(await served_by(client, url, 6))) == ["a\n", "b\n"]
        await reg.deregister("users", "a-1")
        await eventually(lambda: len(server.table.groups["app"].backends) == 1)
        assert set(await served_by(client, url, 6)) == {"b\n"}
        # status critical: still registered, no longer routed to
        await reg.register(instance(a, "a-1"))
        await eventually(lambda: len(server.table.groups["app"].backends) == 2)
        await reg.heartbeat("users", "b-1", CRITICAL)
        await eventually(lambda: server.table.groups["app"].up.count(True) == 1)
        assert set(await served_by(client, url, 6)) == {"a\n"}
        await reg.heartbeat("users", "b-1", PASSING)
        await eventually(lambda: all(server.table.groups["app"].up))
        stats = server.statistics()["registry"]
        assert stats["followed"] == {"users": 2} and stats["reachable"] is True


async def test_ttl_expiry_removes_an_instance_that_stops_heartbeating() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(service_doc()) as (server, url),
        httpx.AsyncClient() as client,
    ):
        reg = store(server)
        await reg.register(instance(a, "a-1"))  # no TTL
        await reg.register(instance(b, "b-1", ttl=0.5))
        await eventually(lambda: len(server.table.groups["app"].backends) == 2)
        await eventually(lambda: len(server.table.groups["app"].backends) == 1, timeout=10)
        assert set(await served_by(client, url, 4)) == {"a\n"}
        assert server.statistics()["registry"]["expired"] == 1


async def test_in_flight_request_finishes_on_a_deregistered_instance() -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: RecordedRequest) -> Response:
        arrived.set()
        await release.wait()
        return Response(body=b"finished\n")

    async with (
        HttpBackend("slow", handler=slow) as s,
        running(service_doc()) as (server, url),
        httpx.AsyncClient(timeout=10) as client,
    ):
        reg = store(server)
        await reg.register(instance(s, "s-1"))
        await eventually(lambda: len(server.table.groups["app"].backends) == 1)
        pending = asyncio.ensure_future(client.get(url + "/long"))
        await asyncio.wait_for(arrived.wait(), 5)
        await reg.deregister("users", "s-1")
        await eventually(lambda: len(server.table.groups["app"].backends) == 0)
        assert (await client.get(url + "/new")).status_code == 503  # nothing new goes there
        release.set()
        r = await pending
        assert (r.status_code, r.text) == (200, "finished\n")


async def test_operator_state_and_health_checks_survive_membership_changes() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(service_doc(health={"interval": "0.3s", "timeout": "0.3s"})) as (server, url),
        httpx.AsyncClient() as client,
    ):
        reg = store(server)
        await reg.register(instance(a, "a-1"))
        await eventually(lambda: len(server.table.groups["app"].backends) == 1)
        server.membership.set_backend_state("app", a.url, "drain")
        await reg.register(instance(b, "b-1"))
        await eventually(lambda: len(server.table.groups["app"].backends) == 2)
        # the operator's drain of a outlived the change; b was probed and is up
        statuses = server.membership.board.statistics()["app"]["backends"]
        assert statuses[a.url]["state"] == "drain"
        await eventually(
            lambda: any(len(s.history) > 0 for s in server.membership.checkers[0].states)
        )
        assert set(await served_by(client, url, 4)) == {"b\n"}
        await b.stop()  # b dies: the active checks (restarted for the new membership) see it
        await eventually(lambda: not server.table.groups["app"].up[1], timeout=10)
