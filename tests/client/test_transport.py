"""httpx transports: requests to http://SERVICE/ spread over real HttpBackends by policy."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from poise.client import AsyncBalancingTransport, AsyncResolver, BalancingTransport, Resolver
from poise.testing import HttpBackend
from poise.testing.procs import free_port
from tests.client.support import Harness

pytestmark = pytest.mark.timeout(60)


def served(backends: list[HttpBackend]) -> Counter[str]:
    return Counter({b.name: len(b.requests) for b in backends})


def three(registry: Harness) -> list[HttpBackend]:
    backends = [registry.backend(f"b{n}") for n in range(3)]
    for b in backends:
        registry.put("users", b.name, b.port)
    return backends


async def test_round_robin_spread_rewrite_and_host(registry: Harness) -> None:
    backends = three(registry)
    transport = AsyncBalancingTransport(registry.url)
    async with httpx.AsyncClient(transport=transport) as client:
        bodies: Counter[str] = Counter()
        for _ in range(30):
            r = await client.get("http://users/items?q=1")
            assert r.status_code == 200 and r.request.url == "http://users/items?q=1"
            bodies[r.text.strip()] += 1
    assert bodies == {"b0": 10, "b1": 10, "b2": 10} == served(backends)
    for b in backends:
        assert {r.target for r in b.requests} == {"/items?q=1"}
        assert {r.header("host") for r in b.requests} == {f"127.0.0.1:{b.port}"}


async def test_keep_host_sends_the_service_name(registry: Harness) -> None:
    (b,) = [registry.backend("b0")]
    registry.put("users", "b0", b.port)
    transport = AsyncBalancingTransport(registry.url, keep_host=True)
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.post("http://users/p", content=b"body")
        assert r.status_code == 200
    assert b.requests[0].header("host") == "users" and b.requests[0].body == b"body"


async def test_connect_failure_is_retried_on_another_instance(registry: Harness) -> None:
    backends = three(registry)
    dead = free_port()  # nothing listens there: connections are refused
    registry.put("users", "dead", dead)
    registry.put("users", "sick", registry.backend("sick").port, status="critical")
    resolver = AsyncResolver(registry.url, "round_robin")
    transport = AsyncBalancingTransport(resolver, attempts=2)
    async with httpx.AsyncClient(transport=transport) as client:
        codes = Counter([(await client.get("http://users/")).status_code for _ in range(40)])
    await resolver.aclose()
    assert codes == {200: 40}  # 0 errors
    stats = transport.statistics()
    assert stats["balanced"] == 40 and stats["failed"] == 0 and stats["retries"] >= 1
    assert sum(served(backends).values()) == 40
    assert len(registry.backends[-1].requests) == 0  # critical: never sent anything
    # refused once, then tried only as a last resort for a while
    assert resolver.statistics()["ejected"] == 1


async def test_consistent_hash_by_header_and_load_accounting(registry: Harness) -> None:
    backends = three(registry)
    policy = {"name": "consistent_hash", "key": "header:X-User"}
    async with httpx.AsyncClient(transport=AsyncBalancingTransport(registry.url, policy)) as c:
        for user in "abcdefghij":
            names = {(await c.get("http://users/", headers={"X-User": user})).text for _ in "123"}
            assert len(names) == 1  # one user, one instance
    assert len([b for b in backends if b.requests]) > 1
    resolver = AsyncResolver(registry.url, "least_conn")
    async with httpx.AsyncClient(transport=AsyncBalancingTransport(resolver)) as c:
        async with c.stream("GET", "http://users/") as r:
            assert resolver.views["users"].load is not None
            assert sum(resolver.views["users"].load.active) == 1  # in flight until closed
            await r.aread()
        assert sum(resolver.views["users"].load.active) == 0
    await resolver.aclose()


async def test_pass_through_and_no_usable_instance(registry: Harness) -> None:
    b = registry.backend("plain")
    transport = AsyncBalancingTransport(registry.url)
    async with httpx.AsyncClient(transport=transport) as c:
        assert (await c.get(f"{b.url}/direct")).text == "plain\n"  # an address: untouched
        assert (await c.get(f"http://localhost:{b.port}/")).status_code == 200
        registry.put("users", "x", b.port, status="critical")
        with pytest.raises(httpx.ConnectError, match="none of its 1 instance"):
            await c.get("http://users/")
    assert [r.target for r in b.requests] == ["/direct", "/"]
    assert transport.statistics() == {"balanced": 0, "passed_through": 2, "retries": 0, "failed": 1}


def test_sync_transport_spreads_and_retries(registry: Harness) -> None:
    backends = three(registry)
    registry.put("users", "dead", free_port())
    with httpx.Client(transport=BalancingTransport(registry.url, "wrr")) as client:
        replies = [client.get("http://users/s", headers={"X-Test": "1"}) for _ in range(30)]
    assert {r.status_code for r in replies} == {200}
    # the dead instance's turns go to the next in its rotation, as in the proxy
    assert sum(served(backends).values()) == 30 and min(served(backends).values()) >= 5
    headers = json.dumps(backends[0].requests[0].headers)
    assert "X-Test" in headers


def test_sync_transport_from_many_threads_keeps_load_consistent(registry: Harness) -> None:
    backends = three(registry)
    resolver = Resolver(registry.url, "least_conn")
    with httpx.Client(transport=BalancingTransport(resolver)) as client:

        def work(_: int) -> list[int]:
            return [client.get("http://users/t").status_code for _ in range(15)]

        with ThreadPoolExecutor(4) as pool:
            codes = [c for batch in pool.map(work, range(4)) for c in batch]
    load = resolver.view("users").load
    resolver.close()
    assert codes == [200] * 60 and sum(served(backends).values()) == 60
    assert load is not None and load.active == [0, 0, 0]  # every start matched by a finish
