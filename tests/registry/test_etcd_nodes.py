"""Several poise nodes on one etcd (real etcd processes on 127.0.0.1): each node's session
lease, TTLs held in the node's memory, heartbeats forwarded to the owner, takeover when the
owner is gone, node death, restart and a lost lease (``poise.registry.etcd``'s docstring)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import httpx
import pytest

from poise.config.model import RegistryConfig
from poise.registry import Instance
from poise.registry.api import RegistryApi
from poise.registry.etcd import EtcdStore
from poise.testing import FakeClock
from poise.testing.etcd import EtcdServer

pytestmark = pytest.mark.timeout(90)
TOKEN = "node-test-token-0123456789"
DEADLINE = 15.0  # seconds a condition may take to come true (a loaded 2-core machine)


def inst(iid: str, port: int = 8000, **kw: object) -> Instance:
    return Instance("users", iid, "127.0.0.1", port, **kw)  # type: ignore[arg-type]


@dataclass
class Node:
    store: EtcdStore
    api: RegistryApi
    url: str

    async def kill(self) -> None:
        """What etcd sees of ``kill -9``: the node stops answering, its lease is left."""
        await self.api.close()
        await self.store.close()

    async def beat(self, iid: str) -> int:
        """A heartbeat through this node's registry API (HTTP, as an instance sends it)."""
        async with httpx.AsyncClient() as client:
            r = await client.put(
                f"{self.url}/v1/services/users/instances/{iid}/heartbeat",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        return r.status_code


@asynccontextmanager
async def cluster(
    etcd: EtcdServer, n: int, *, clock: FakeClock | None = None, node_ttl: float = 10.0,
    names: list[str] | None = None, prefix: str | None = None,
) -> AsyncIterator[list[Node]]:  # fmt: skip
    """``n`` nodes (a store and its registry API each) on one prefix of ``etcd``."""
    prefix = prefix or f"/poise-test/{uuid4().hex[:8]}"
    cfg = RegistryConfig(store="etcd", endpoints=(etcd.url,), prefix=prefix, token=TOKEN)
    nodes = []
    try:
        for i in range(n):
            store = EtcdStore(
                etcd.url, prefix=prefix, node=(names or [f"n{i}" for i in range(n)])[i],
                token=TOKEN, node_ttl=node_ttl, clock=clock or time.monotonic,
            )  # fmt: skip
            api = RegistryApi(store, cfg)
            host, port = await api.start("127.0.0.1", 0)
            store.advertise = f"http://{host}:{port}"
            nodes.append(Node(store, api, store.advertise))
            await store.revision()  # started: listing and watching
        yield nodes
    finally:
        for node in nodes:
            await node.api.close()
            await node.store.close()
        await asyncio.to_thread(etcd.clear)


def raw(etcd: EtcdServer, path: str) -> dict[str, Any] | None:
    """A key as etcd holds it now (value decoded), read past every store."""
    req = urllib.request.Request(
        f"{etcd.url}/v3/kv/range",
        data=json.dumps({"key": base64.b64encode(path.encode()).decode()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as response:
        data = json.loads(response.read())
    kvs = data.get("kvs")
    if not kvs:
        return None
    kv = kvs[0]
    return {**json.loads(base64.b64decode(kv["value"])), "lease": int(kv.get("lease", 0)),
            "mod_revision": int(kv["mod_revision"])}  # fmt: skip


def etcd_revision(etcd: EtcdServer) -> int:
    return int(etcd.status()["header"]["revision"])


def revoke(etcd: EtcdServer, lease: int) -> None:
    req = urllib.request.Request(
        f"{etcd.url}/v3/lease/revoke", data=json.dumps({"ID": str(lease)}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(req, timeout=5).close()


async def until(what: str, check: Callable[[], Awaitable[bool]] | Callable[[], bool]) -> float:
    """Poll ``check`` until it is true; the seconds it took."""
    t0 = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < DEADLINE, f"{what}: not within {DEADLINE:g}s"
        await asyncio.sleep(0.01)


async def listed(node: Node) -> list[str]:
    return [i.id for i in (await node.store.instances("users"))[0]]


async def test_heartbeats_alternating_between_nodes_cost_etcd_nothing(etcd: EtcdServer) -> None:
    clock = FakeClock(1000.0)
    async with cluster(etcd, 2, clock=clock) as (a, b):
        x = await a.store.register(inst("x", 8001, ttl=10.0))
        await until("b's mirror has x", lambda: b.store._mirror.get(("users", "x")) is not None)
        before = etcd_revision(etcd)
        for n in range(12):  # 12 x 4 s = 48 s of heartbeats, 4.8 TTLs
            clock.advance(4.0)
            via = (a, b)[n % 2]
            received = a.store.received
            assert await via.beat("x") == 200
            if via is b:  # forwarded: wait until the owner has it
                await until("a received the forwarded heartbeat",
                            lambda n=received: a.store.received > n)  # fmt: skip
            assert await a.store.expire() == 0 and await b.store.expire() == 0
        assert etcd_revision(etcd) == before, "a heartbeat wrote to etcd"
        assert (a.store.writes, b.store.writes) == (1, 0)  # the registration only
        assert (b.store.forwarded, a.store.received) == (6, 6)
        held = raw(etcd, f"{a.store.prefix}/instances/users/x")
        assert held is not None and held["node"] == "n0", "ownership moved"
        assert await listed(b) == ["x"] and (await a.store.instances("users"))[0] == (x,)

        # no more heartbeats: the owner deletes it when its TTL runs out, as expired
        events = b.store.watch(etcd_revision(etcd))
        clock.advance(10.5)
        assert await a.store.expire() == 1
        gone = await asyncio.wait_for(anext(events), 10)
        await events.aclose()
        assert (gone.kind, gone.id, gone.reason) == ("delete", "x", "expired")
        await until("b no longer lists x", lambda: _not_listed(b, "x"))
        assert await b.beat("x") == 404


async def _not_listed(node: Node, iid: str) -> bool:
    return iid not in await listed(node)


async def test_a_heartbeat_for_an_owner_that_cannot_be_reached_takes_the_instance_over(
    etcd: EtcdServer,
) -> None:
    async with cluster(etcd, 2) as (a, b):
        await a.store.register(inst("x", 8001, ttl=30.0))
        await a.store.register(inst("y", 8002, ttl=30.0))  # its heartbeats stop with a
        old_lease = a.store._lease
        await until("b's mirror has x", lambda: ("users", "x") in b.store._mirror)
        await a.kill()  # its API is gone; its lease lives on until it runs out
        assert await b.beat("x") == 200  # answered at once; the forward fails after
        await until("b took x over",
                    lambda: (raw(etcd, f"{b.store.prefix}/instances/users/x") or {})
                    .get("node") == "n1")  # fmt: skip
        assert b.store.takeovers == 1
        assert raw(etcd, f"{b.store.prefix}/instances/users/x")["lease"] == b.store._lease  # type: ignore[index]
        # a's lease runs out (revoked here, not waited for): y goes with it, x stays
        await asyncio.to_thread(revoke, etcd, old_lease)
        await until("y expired with its node", lambda: _not_listed(b, "y"))
        assert await listed(b) == ["x"]
        assert await b.beat("x") == 200 and b.store.writes == 1  # held by b now: no write


async def test_a_node_that_dies_takes_its_instances_within_its_lease_ttl(
    etcd: EtcdServer,
) -> None:
    async with cluster(etcd, 2, node_ttl=2.0) as (a, b):
        await a.store.register(inst("x", 8001, ttl=60.0))
        kept = await b.store.register(inst("z", 8003, ttl=60.0))
        await until("b lists x", lambda: _listed_is(b, ["x", "z"]))
        await a.kill()
        took = await until("x gone from b", lambda: _listed_is(b, ["z"]))
        # etcd's lease timer: the node TTL, and etcd checks expiries every 500 ms
        assert took < 2.0 + 1.5, f"x left b's listing {took:.1f}s after its node died"
        assert (await b.store.instances("users"))[0] == (kept,)


async def _listed_is(node: Node, ids: list[str]) -> bool:
    return await listed(node) == ids


async def test_a_restarted_node_takes_back_its_instances(etcd: EtcdServer) -> None:
    prefix = f"/poise-test/{uuid4().hex[:8]}"
    async with cluster(etcd, 1, names=["n-restart"], prefix=prefix) as (a,):
        x = await a.store.register(inst("x", 8001, ttl=30.0))
        old_lease = a.store._lease
        await a.kill()
        async with cluster(etcd, 1, names=["n-restart"], prefix=prefix) as (again,):
            await until("x adopted", lambda: again.store.adopted == 1)
            held = raw(etcd, f"{prefix}/instances/users/x")
            assert held is not None and held["lease"] == again.store._lease != old_lease
            await asyncio.to_thread(revoke, etcd, old_lease)  # the old run's lease ends
            assert await again.beat("x") == 200  # held here again: in memory
            (after,) = (await again.store.instances("users"))[0]
            assert after.same_registration(x) and after.revision > x.revision


async def test_a_node_whose_lease_ran_out_writes_its_instances_back(etcd: EtcdServer) -> None:
    async with cluster(etcd, 2) as (a, b):
        await a.store.register(inst("x", 8001, ttl=30.0))
        await until("b lists x", lambda: _listed_is(b, ["x"]))
        await asyncio.to_thread(revoke, etcd, a.store._lease)  # etcd forgot the node
        await until("a took a new lease", lambda: a.store.sessions == 2)
        await until("x is back on b", lambda: _listed_is(b, ["x"]))
        held = raw(etcd, f"{a.store.prefix}/instances/users/x")
        assert held is not None and held["lease"] == a.store._lease and held["node"] == "n0"
        assert await a.beat("x") == 200


async def test_an_instance_deleted_by_hand_is_gone(etcd: EtcdServer) -> None:
    async with cluster(etcd, 1) as (a,):
        await a.store.register(inst("x", 8001, ttl=30.0))
        req = urllib.request.Request(
            f"{etcd.url}/v3/kv/deleterange",
            data=json.dumps({"key": base64.b64encode(
                f"{a.store.prefix}/instances/users/x".encode()).decode()}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(req, timeout=5).close()
        await until("a lets x go", lambda: ("users", "x") not in a.store._owned)
        assert await a.beat("x") == 404 and a.store.sessions == 1


async def test_identical_registrations_through_two_nodes_make_one_change(
    etcd: EtcdServer,
) -> None:
    async with cluster(etcd, 2) as nodes:
        same = inst("a", 8001, ttl=30.0, tags=("v1",))
        results = await asyncio.gather(*(nodes[n % 2].store.register(same) for n in range(10)))
        assert len({r.revision for r in results}) == 1, "one registration, one revision"
        assert sum(n.store.writes for n in nodes) == 1
        assert sum(n.store.takeovers for n in nodes) == 0


async def test_a_status_change_is_written_and_held_by_the_node_that_got_it(
    etcd: EtcdServer,
) -> None:
    async with cluster(etcd, 2) as (a, b):
        await a.store.register(inst("x", 8001, ttl=30.0))
        await until("b's mirror has x", lambda: ("users", "x") in b.store._mirror)
        changed = await b.store.heartbeat("users", "x", "critical")
        assert changed.status == "critical"
        await until("a lets x go", lambda: ("users", "x") not in a.store._owned)
        assert (await a.store.instances("users"))[0] == (changed,)
        assert await a.beat("x") == 200  # forwarded to b, which holds it now
        await until("b got it", lambda: b.store.received == 1)


async def test_forwarded_heartbeats_need_the_token(etcd: EtcdServer) -> None:
    async with cluster(etcd, 1) as (a,), httpx.AsyncClient() as client:
        r = await client.post(f"{a.url}/v1/internal/heartbeats", json={"beats": []})
        assert r.status_code == 401
        r = await client.post(
            f"{a.url}/v1/internal/heartbeats", json={"beats": [["users"]]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        assert r.status_code == 400 and "beats" in r.json()["error"]


async def test_metrics_count_heartbeats_held_forwarded_and_written(etcd: EtcdServer) -> None:
    from poise.admin import metrics
    from poise.registry.service import RegistryService

    async with cluster(etcd, 2) as (a, b):
        await a.store.register(inst("x", 8001, ttl=30.0))
        await until("b's mirror has x", lambda: ("users", "x") in b.store._mirror)
        assert await b.beat("x") == 200
        await until("a received it", lambda: a.store.received == 1)
        texts = []
        for node in (a, b):
            out = metrics._Out()
            cfg = RegistryConfig(store="etcd", endpoints=(etcd.url,))
            metrics._registry(out, RegistryService(cfg, store=node.store))
            texts.append(out.text())
        for line in (
            "poise_registry_held_instances 1",
            "poise_registry_store_writes_total 1",
            'poise_registry_forwarded_heartbeats_total{direction="received"} 1',
        ):
            assert line + "\n" in texts[0], texts[0]  # fmt: skip
        for line in (
            'poise_registry_heartbeats_total{store="etcd"} 1',
            "poise_registry_held_instances 0",
            'poise_registry_forwarded_heartbeats_total{direction="sent"} 1',
        ):
            assert line + "\n" in texts[1], texts[1]  # fmt: skip
