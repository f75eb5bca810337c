"""Register, heartbeat, re-register and deregister against a real registry API on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from poise.client import AsyncRegistry, Registry, RegistryUnreachable
from poise.errors import InvalidInstance, RegistryError
from tests.client.conftest import TOKEN
from tests.client.support import Harness, await_until, wait_until

pytestmark = pytest.mark.timeout(60)
TTL = "500ms"


async def test_heartbeats_keep_it_and_exit_deregisters(registry: Harness) -> None:
    async with AsyncRegistry(registry.url, TOKEN) as client:
        async with client.register("users", port=8001, ttl=TTL, tags=["v1"]) as reg:
            assert reg.id.startswith("users-") and reg.id.endswith("-8001")
            assert registry.ids("users") == [reg.id]
            (inst,) = registry.instances("users")
            assert (inst.port, inst.ttl, inst.tags, inst.status) == (8001, 0.5, ("v1",), "passing")
            # six TTLs of heartbeats: still there, with the same registration
            await await_until(lambda: reg.heartbeats >= 18, "18 heartbeats")
            assert registry.ids("users") == [reg.id] and reg.registrations == 1
            assert await client.instances("users") == registry.instances("users")
            assert await client.services() == {"users": 1}
        assert registry.ids("users") == []  # deregistered on exit, not left to expire


async def test_without_deregister_the_ttl_expires_it(registry: Harness) -> None:
    async with AsyncRegistry(registry.url, TOKEN) as client:
        reg = client.register("users", port=8001, ttl=TTL, id="u1")
        await reg.start()
        assert registry.ids("users") == ["u1"]
        await reg.stop(deregister=False)
        await await_until(lambda: registry.ids("users") == [], "expired after its TTL")


async def test_a_registration_that_timed_out_is_deregistered_on_exit(registry: Harness) -> None:
    # no TTL: an instance left behind would stay routed forever
    async with AsyncRegistry(registry.url, TOKEN, timeout=0.3) as client:
        with registry.paused():
            async with client.register("users", port=8001, ttl=None, id="u1") as reg:
                assert not reg.registered  # the PUT timed out: its fate is unknown
        # the queued PUT lands now; the DELETE sent on exit must follow it
        await await_until(lambda: registry.revision() >= 1, "the queued registration landed")
        await await_until(lambda: registry.ids("users") == [], "deregistered")


async def test_set_status_is_sent_at_once(registry: Harness) -> None:
    client = AsyncRegistry(registry.url, TOKEN)
    # a long interval: only the wake-up can send the status within the deadline
    async with client, client.register("users", port=8001, ttl="60s", interval=30) as reg:
        reg.set_status("warning")
        await await_until(
            lambda: registry.instances("users")[0].status == "warning", "status warning"
        )
        with pytest.raises(InvalidInstance):
            reg.set_status("great")


async def test_reregisters_after_the_registry_restarts_empty(registry: Harness) -> None:
    client = AsyncRegistry(registry.url, TOKEN)
    async with client, client.register("users", port=8001, ttl=TTL, id="u1") as reg:
        reg.set_status("warning")
        await await_until(lambda: registry.instances("users")[0].status == "warning", "warn")
        registry.restart()  # a new, empty store on the same port
        assert registry.ids("users") == []
        await await_until(lambda: reg.registrations == 2, "re-registered")
        assert registry.ids("users") == ["u1"]
        # re-registered with its current status, not the initial one
        assert registry.instances("users")[0].status == "warning"


async def test_survives_an_unreachable_registry(registry: Harness) -> None:
    registry.stop()
    async with AsyncRegistry(registry.url, TOKEN) as client:
        # entering does not fail: the app starts even though the registry is down
        async with client.register("users", port=8001, ttl=TTL, id="u1") as reg:
            assert not reg.registered
            await await_until(lambda: reg.failures >= 2, "retried while down")
            assert "registry" in reg.last_error
            registry.start()
            await await_until(lambda: reg.registered, "registered once back")
            assert registry.ids("users") == ["u1"] and reg.last_error == ""
            registry.stop()  # down while registered: heartbeats fail, nothing raises
            failures = reg.failures
            await await_until(lambda: reg.failures > failures + 1, "heartbeats failing")
            registry.start()
            await await_until(lambda: registry.ids("users") == ["u1"], "re-registered")
        with pytest.raises(RegistryUnreachable):
            registry.stop()
            await client.services()


async def test_refused_registration_raises_at_the_call_site(registry: Harness) -> None:
    with pytest.raises(InvalidInstance) as bad:
        AsyncRegistry(registry.url).register("Not A Name", port=1, ttl="x")
    assert [p.split(":")[0] for p in bad.value.problems] == ["service", "ttl"]
    async with AsyncRegistry(registry.url, "wrong-token-0123456789") as client:
        with pytest.raises(RegistryError, match="401"):
            async with client.register("users", port=8001):
                pass
    assert registry.ids("users") == []


async def test_watch_yields_every_change(registry: Harness) -> None:
    async with AsyncRegistry(registry.url, TOKEN) as client:
        seen: list[list[str]] = []
        watch = client.watch("users", wait=10)

        async def consume() -> None:
            async for found in watch:
                seen.append([i.id for i in found])
                if len(seen) == 3:
                    return

        task = asyncio.create_task(consume())
        await await_until(lambda: seen == [[]], "the first listing")
        registry.put("users", "a", 9001)
        await await_until(lambda: len(seen) == 2, "a registered")
        registry.put("users", "b", 9002)
        await asyncio.wait_for(task, 15)
        assert seen == [[], ["a"], ["a", "b"]]


def test_sync_registration(registry: Harness) -> None:
    with Registry(registry.url, TOKEN) as client:
        with client.register("users", port=8002, ttl=TTL, id="s1") as reg:
            assert registry.ids("users") == ["s1"] and reg.registered
            wait_until(lambda: reg.registered and reg.heartbeats >= 6, "heartbeats from the thread")
            reg.set_status("critical")
            wait_until(lambda: registry.instances("users")[0].status == "critical", "critical")
            registry.restart()
            wait_until(lambda: registry.ids("users") == ["s1"], "re-registered")
            assert client.instances("users")[0].status == "critical"
            assert client.services() == {"users": 1}
            watch = client.watch("users", wait=5)
            assert [i.id for i in next(watch)] == ["s1"]
        assert registry.ids("users") == []
        with (
            pytest.raises(RegistryError, match="401"),
            Registry(registry.url).register("users", port=8002),
        ):
            pass
