"""``check_store``: the conformance kit every registry ``Store`` implementation must pass
(memory, SQLite and etcd all run it).

Run against a store factory::

    await check_store(lambda: make_a_fresh_empty_store(), clock=fake_clock)

``make`` returns a fresh, empty store for each check. With a ``FakeClock`` (the one the store
was given), TTL checks move it and call ``expire()``; without one (etcd: leases expire on the
server) they wait in real time for a short TTL, polling with a generous deadline. ``reopen``
(optional) closes a store and opens it again on the same data, for persistent stores;
``close()`` must be harmless on a closed store.

Each check is also available alone in ``STORE_CHECKS`` so a test suite can parametrize over
them and report them one by one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from poise.errors import NotRegistered
from poise.registry.model import CRITICAL, DELETE, PUT, WARNING, Event, Instance
from poise.registry.store import Store
from poise.testing.clock import FakeClock

__all__ = ["STORE_CHECKS", "StoreKit", "check_store"]

Make = Callable[[], Awaitable[Store]]
Reopen = Callable[[Store], Awaitable[Store]]
STEP = 10.0  # seconds any single awaited step may take, at most


@dataclass
class StoreKit:
    make: Make
    clock: FakeClock | None = None
    reopen: Reopen | None = None
    ttl: float = 2.0  # the TTL used by the expiry checks (etcd's leases need >= 2 s)


def inst(service: str, iid: str, port: int = 8000, **kw: object) -> Instance:
    return Instance(service, iid, "127.0.0.1", port, **kw)  # type: ignore[arg-type]


async def _next(events: AsyncGenerator[Event, None]) -> Event:
    return await asyncio.wait_for(anext(events), STEP)


async def _expire(kit: StoreKit, store: Store, gone: Callable[[], Awaitable[bool]]) -> None:
    """Let a TTL run out: on the fake clock at once, else by waiting (polled)."""
    if kit.clock is not None:
        kit.clock.advance(kit.ttl + 0.5)
        await store.expire()
        assert await gone(), "the instance did not expire when its TTL ran out"
        return
    deadline = time.monotonic() + kit.ttl + STEP
    while not await gone():
        assert time.monotonic() < deadline, "the instance did not expire within TTL + 10 s"
        await store.expire()
        await asyncio.sleep(0.1)


# -- the checks ------------------------------------------------------------------------------


async def register_and_list(kit: StoreKit, store: Store) -> None:
    assert await store.instances("users") == ((), await store.revision())
    rev0 = await store.revision()
    b = await store.register(inst("users", "b", 8002, weight=3, tags=("v2",), zone="z1"))
    a = await store.register(inst("users", "a", 8001))
    await store.register(inst("orders", "o1", 9001))
    assert rev0 < b.revision < a.revision
    listed, rev = await store.instances("users")
    assert [i.id for i in listed] == ["a", "b"], "instances are listed by id"
    assert listed[1].weight == 3 and listed[1].tags == ("v2",) and listed[1].zone == "z1"
    assert listed[0] == a and listed[1] == b
    assert rev == await store.revision() and rev > a.revision
    services, rev2 = await store.services()
    assert services == {"orders": 1, "users": 2} and rev2 == rev


async def reregister_identical_is_not_a_change(kit: StoreKit, store: Store) -> None:
    first = await store.register(inst("users", "a", 8001))
    again = await store.register(inst("users", "a", 8001))
    assert again.revision == first.revision == await store.revision()
    moved = await store.register(inst("users", "a", 8009))
    assert moved.revision > first.revision and moved.port == 8009
    assert (await store.instances("users"))[0] == (moved,)


async def heartbeat_and_status(kit: StoreKit, store: Store) -> None:
    try:
        await store.heartbeat("users", "nobody")
    except NotRegistered as exc:
        assert exc.service == "users" and exc.instance == "nobody"
    else:
        raise AssertionError("a heartbeat for an unknown instance must raise NotRegistered")
    a = await store.register(inst("users", "a", ttl=30.0))
    same = await store.heartbeat("users", "a")
    assert same.revision == a.revision, "a plain heartbeat is not a change"
    warned = await store.heartbeat("users", "a", WARNING)
    assert warned.status == WARNING and warned.revision > a.revision
    assert (await store.instances("users"))[0][0].status == WARNING
    again = await store.heartbeat("users", "a", WARNING)
    assert again.revision == warned.revision


async def deregister(kit: StoreKit, store: Store) -> None:
    await store.register(inst("users", "a"))
    rev = await store.revision()
    assert await store.deregister("users", "a") is True
    assert await store.revision() > rev
    assert await store.deregister("users", "a") is False
    assert (await store.instances("users"))[0] == ()
    assert "users" not in (await store.services())[0]


async def watch_resumes_in_order(kit: StoreKit, store: Store) -> None:
    start = await store.revision()
    a = await store.register(inst("users", "a"))
    b = await store.register(inst("users", "b"))
    await store.deregister("users", "a")
    events = store.watch(start)
    try:
        seen = [await _next(events) for _ in range(3)]
    finally:
        await events.aclose()
    assert [(e.kind, e.id) for e in seen] == [(PUT, "a"), (PUT, "b"), (DELETE, "a")]
    assert seen[0].instance == a and seen[1].instance == b
    assert seen[2].reason == "deregistered"
    assert [e.revision for e in seen] == sorted({e.revision for e in seen})
    # resuming after the second event yields only the third
    events = store.watch(seen[1].revision)
    try:
        assert (await _next(events)).revision == seen[2].revision
    finally:
        await events.aclose()


async def watch_delivers_live_changes(kit: StoreKit, store: Store) -> None:
    events = store.watch(await store.revision())
    try:
        waiting = asyncio.ensure_future(_next(events))
        await asyncio.sleep(0.05)  # let the watch start waiting (either order must work)
        c = await store.register(inst("users", "c", 8003))
        got = await waiting
        assert (got.kind, got.instance) == (PUT, c)
        crit = await store.heartbeat("users", "c", CRITICAL)
        got = await _next(events)
        assert got.instance is not None and got.instance.status == CRITICAL
        assert got.revision == crit.revision
    finally:
        await events.aclose()


async def blocking_wait(kit: StoreKit, store: Store) -> None:
    rev = await store.revision()
    t0 = time.monotonic()
    assert await store.wait(rev, 0.2) == rev  # nothing happens: the timeout ends it
    assert time.monotonic() - t0 >= 0.15
    assert await store.wait(rev - 1, 5.0) >= rev or rev == 0  # already beyond: at once
    waiter = asyncio.ensure_future(store.wait(rev, STEP, service="users"))
    await asyncio.sleep(0.05)
    await store.register(inst("orders", "o1"))  # another service: not a reason to return
    await asyncio.sleep(0.1)
    assert not waiter.done(), "a change to another service woke a per-service wait"
    a = await store.register(inst("users", "a"))
    assert await asyncio.wait_for(waiter, STEP) == a.revision


async def ttl_expiry(kit: StoreKit, store: Store) -> None:
    start = await store.revision()
    await store.register(inst("users", "kept"))  # no TTL: never expires
    await store.register(inst("users", "lapsed", ttl=kit.ttl))

    async def gone() -> bool:
        return [i.id for i in (await store.instances("users"))[0]] == ["kept"]

    await _expire(kit, store, gone)
    events = store.watch(start)
    try:
        seen = [await _next(events) for _ in range(3)]
    finally:
        await events.aclose()
    assert (seen[2].kind, seen[2].id, seen[2].reason) == (DELETE, "lapsed", "expired")
    try:
        await store.heartbeat("users", "lapsed")
    except NotRegistered:
        pass
    else:
        raise AssertionError("an expired instance still took a heartbeat")


async def heartbeats_keep_an_instance(kit: StoreKit, store: Store) -> None:
    await store.register(inst("users", "alive", ttl=kit.ttl))
    if kit.clock is not None:
        for _ in range(10):  # 10 TTLs pass, one heartbeat within each
            kit.clock.advance(kit.ttl * 0.6)
            await store.heartbeat("users", "alive")
            await store.expire()
    else:
        deadline = time.monotonic() + kit.ttl * 2.5
        while time.monotonic() < deadline:
            await store.heartbeat("users", "alive")
            await store.expire()
            await asyncio.sleep(kit.ttl / 4)
    assert [i.id for i in (await store.instances("users"))[0]] == ["alive"]


async def persists_across_reopen(kit: StoreKit, store: Store) -> None:
    if kit.reopen is None:
        return  # not a persistent store
    await store.register(inst("users", "a", 8001, ttl=30.0, meta={"v": "1"}))
    b = await store.register(inst("users", "b", 8002))
    await store.deregister("users", "a")
    rev = await store.revision()
    store = await kit.reopen(store)
    try:
        assert await store.revision() == rev, "the revision must survive a restart"
        assert (await store.instances("users"))[0] == (b,)
        c = await store.register(inst("users", "c", 8003))
        assert c.revision > rev, "revisions keep growing after a restart"
        events = store.watch(b.revision)  # history before the restart is still there
        try:
            kinds = [(e.kind, e.id) for e in [await _next(events) for _ in range(2)]]
        finally:
            await events.aclose()
        assert kinds == [(DELETE, "a"), (PUT, "c")]
    finally:
        await store.close()


STORE_CHECKS: tuple[Callable[[StoreKit, Store], Awaitable[None]], ...] = (
    register_and_list,
    reregister_identical_is_not_a_change,
    heartbeat_and_status,
    deregister,
    watch_resumes_in_order,
    watch_delivers_live_changes,
    blocking_wait,
    ttl_expiry,
    heartbeats_keep_an_instance,
    persists_across_reopen,
)


async def run_check(kit: StoreKit, check: Callable[[StoreKit, Store], Awaitable[None]]) -> None:
    store = await kit.make()
    try:
        await check(kit, store)
    finally:
        await store.close()  # closing twice (after a reopen) is harmless


async def check_store(
    make: Make,
    *,
    clock: FakeClock | None = None,
    reopen: Reopen | None = None,
    ttl: float = 2.0,
) -> None:
    """Run every check against fresh stores from ``make``; the first failure raises
    AssertionError naming the check."""
    kit = StoreKit(make, clock, reopen, ttl)
    for check in STORE_CHECKS:
        try:
            await run_check(kit, check)
        except AssertionError as exc:
            raise AssertionError(f"store check {check.__name__} failed: {exc}") from exc
