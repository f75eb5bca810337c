"""Issue #23 end to end: with one of three backends drained (admin API) or stopped, the two
left share 300 sequential requests or connections evenly, on an HTTP listener and on a TCP
one (they were split 100/200: the missing backend's successor took its turns); least_conn
with weights 5,1,1 and sequential requests splits them 5:1:1 (was even)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from poise.server import Server
from poise.testing import HttpBackend, TcpEcho
from tests.integration.l4support import roundtrip, running_tcp, tcp_doc
from tests.integration.support import eventually, running

pytestmark = pytest.mark.timeout(120)
TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def http_doc(backends: list[Any], policy: str, health: dict[str, Any]) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"backends": backends, "policy": policy, "health_check": health}},
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
    }


def admin_url(server: Server) -> str:
    assert server.admin_address is not None
    host, port = server.admin_address
    return f"http://{host}:{port}"


async def drain(server: Server, upstream: str, address: str) -> None:
    async with httpx.AsyncClient(base_url=admin_url(server), headers=AUTH) as admin:
        r = await admin.put(
            f"/v1/upstreams/{upstream}/backends/{address}/state", json={"state": "drain"}
        )
        assert r.status_code == 200, r.text


async def served(url: str, n: int) -> Counter[str]:
    """``n`` sequential requests by a client that does not retry; every one must succeed."""
    counts: Counter[str] = Counter()
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(retries=0)) as client:
        for i in range(n):
            r = await client.get(f"{url}/{i}")
            assert r.status_code == 200, r.text
            counts[r.text.strip()] += 1
    return counts


@pytest.mark.parametrize("policy", ["round_robin", "weighted_round_robin", "least_conn"])
async def test_http_with_one_of_three_drained_the_other_two_share_evenly(policy: str) -> None:
    async with (
        HttpBackend("b1") as b1,
        HttpBackend("b2") as b2,
        HttpBackend("b3") as b3,
        running(http_doc([b1.url, b2.url, b3.url], policy, {"enabled": False})) as (server, url),
    ):
        assert sum((await served(url, 7)).values()) == 7  # all three in, for a while
        await drain(server, "app", b2.url.split("//")[1])
        counts = await served(url, 300)
    assert set(counts) == {"b1", "b3"}
    assert abs(counts["b1"] - 150) <= 1 and abs(counts["b3"] - 150) <= 1, counts


async def test_http_with_one_of_three_stopped_the_other_two_share_evenly() -> None:
    health = {"interval": "0.5s", "timeout": "0.5s", "fall": 2, "rise": 1}
    async with (
        HttpBackend("b1") as b1,
        HttpBackend("b2") as b2,
        HttpBackend("b3") as b3,
        running(http_doc([b1.url, b2.url, b3.url], "round_robin", health)) as (server, url),
    ):
        await b2.stop()
        await eventually(lambda: list(server.table.groups["app"].up) == [True, False, True])
        counts = await served(url, 300)
    assert counts == {"b1": 150, "b3": 150}


async def test_http_least_conn_splits_sequential_requests_by_weight() -> None:
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        HttpBackend("c") as c,
        running(
            http_doc([{"url": a.url, "weight": 5}, b.url, c.url], "least_conn", {"enabled": False})
        ) as (_, url),
    ):
        counts = await served(url, 350)
    # all idle at each pick: smooth WRR, every 7 picks a a b a c a a
    assert counts == {"a": 250, "b": 50, "c": 50}


@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
async def test_tcp_with_one_of_three_drained_the_other_two_share_evenly(policy: str) -> None:
    async with TcpEcho() as t1, TcpEcho() as t2, TcpEcho() as t3:
        doc = tcp_doc([t1.address, t2.address, t3.address], policy=policy)
        doc["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
        async with running_tcp(doc) as (server, addr):
            for i in range(5):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            before = [e.connections_accepted for e in (t1, t2, t3)]
            await drain(server, "u", t2.address.split("//")[1])
            for i in range(300):
                assert await roundtrip(addr, b"%d" % i) == b"%d" % i
            got = [e.connections_accepted - n for e, n in zip((t1, t2, t3), before, strict=True)]
    assert got[1] == 0
    assert abs(got[0] - 150) <= 1 and abs(got[2] - 150) <= 1, got
