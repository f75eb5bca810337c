"""The resolver follows the registry and picks with the proxy's policy code."""

from __future__ import annotations

from collections import Counter

import pytest

from poise.client import AsyncResolver, Resolver
from poise.errors import ConfigError, NoHealthyBackend
from tests.client.support import Harness, await_until, wait_until

pytestmark = pytest.mark.timeout(60)


async def test_follows_changes_and_skips_critical(registry: Harness) -> None:
    registry.put("users", "a", 9001)
    registry.put("users", "b", 9002)
    async with AsyncResolver(registry.url, "round_robin", wait=10) as resolver:

        async def ports() -> list[int]:
            return sorted(b.port for b in await resolver.candidates("users"))

        assert [i.id for i in await resolver.instances("users")] == ["a", "b"]  # listed at once
        registry.put("users", "c", 9003)
        await await_until(lambda: len(resolver.views["users"].instances) == 3, "c arrives")
        assert await ports() == [9001, 9002, 9003]
        registry.put("users", "b", 9002, status="critical")
        await await_until(lambda: resolver.views["users"].usable.count(True) == 2, "b critical")
        assert await ports() == [9001, 9003]
        registry.put("users", "c", 9003, weight=0)  # weight 0: registered, but draining
        registry.delete("users", "a")
        await await_until(lambda: len(resolver.views["users"].instances) == 2, "a leaves")
        with pytest.raises(NoHealthyBackend, match="users"):
            await resolver.pick("users")
        # round robin over three: every instance once in three picks, as the proxy does
        registry.put("users", "a", 9001)
        registry.put("users", "b", 9002)
        registry.put("users", "c", 9003)
        await await_until(lambda: resolver.views["users"].usable.count(True) == 3, "all back")
        picks = Counter([(await resolver.pick("users")).port for _ in range(30)])
        assert picks == {9001: 10, 9002: 10, 9003: 10}


async def test_keeps_the_last_known_instances_while_the_registry_is_down(
    registry: Harness,
) -> None:
    for n in range(5):  # revisions the restarted registry will not reach for a while
        registry.put("users", "a", 9001 + n)
    # a wait longer than the deadline: catching up must not depend on the query timing out
    async with AsyncResolver(registry.url, wait=60) as resolver:
        assert (await resolver.pick("users")).port == 9005
        registry.stop()
        await await_until(lambda: not resolver.reachable, "notices the registry is gone")
        assert (await resolver.pick("users")).port == 9005
        registry.start()  # empty: the instance is gone once the resolver catches up
        registry.put("users", "b", 9002)
        await await_until(lambda: resolver.reachable, "reachable again")
        await await_until(
            lambda: [i.id for i in resolver.views["users"].instances] == ["b"], "caught up", 10
        )
        registry.put("users", "c", 9003)  # and follows the new registry's revisions
        await await_until(lambda: len(resolver.views["users"].instances) == 2, "c arrives", 10)


async def test_hash_policy_from_a_config_style_dict(registry: Harness) -> None:
    for n in range(4):
        registry.put("users", f"u{n}", 9000 + n)
    policy = {"name": "consistent_hash", "key": "header:X-User", "algorithm": "maglev"}
    async with AsyncResolver(registry.url, policy) as resolver:
        first = {k: (await resolver.pick("users", k.encode())).port for k in "abcdefgh"}
        again = {k: (await resolver.pick("users", k.encode())).port for k in "abcdefgh"}
        assert first == again and len(set(first.values())) > 1
    with pytest.raises(ConfigError, match=r"policy\.name: unknown policy"):
        AsyncResolver(registry.url, {"name": "fastest"})


def test_sync_resolver_from_threads(registry: Harness) -> None:
    registry.put("users", "a", 9001)
    with Resolver(registry.url, "p2c", wait=10) as resolver:
        assert resolver.pick("users").port == 9001
        registry.put("users", "b", 9002)
        wait_until(lambda: len(resolver.instances("users")) == 2, "b arrives")
        assert {resolver.pick("users").port for _ in range(50)} == {9001, 9002}
        registry.put("users", "a", 9001, status="critical")
        wait_until(lambda: resolver.view("users").usable == [False, True], "a critical")
        assert {resolver.pick("users").port for _ in range(20)} == {9002}
