"""``RegistryService.follow``: every change is reported, also when a store's listing is one
change behind what woke the loop (etcd: a node answers from its copy, which the watch fills)."""

from __future__ import annotations

import asyncio
import time

import pytest

from poise.config.model import RegistryConfig
from poise.registry import Instance, MemoryStore
from poise.registry.service import RegistryService

pytestmark = pytest.mark.timeout(30)


class LaggingStore(MemoryStore):
    """Lists from a frozen copy while ``frozen`` is set; counts its listings."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen: tuple[tuple[Instance, ...], int] | None = None
        self.listings = 0

    async def instances(self, service: str) -> tuple[tuple[Instance, ...], int]:
        self.listings += 1
        if self.frozen is not None:
            return self.frozen
        return await super().instances(service)


async def until(what: str, check: object) -> None:
    deadline = time.monotonic() + 10
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def test_a_listing_behind_the_wake_up_is_listed_again() -> None:
    store = LaggingStore()
    service = RegistryService(RegistryConfig(store="memory"), store=store)
    seen: list[tuple[str, ...]] = []
    follow = asyncio.ensure_future(
        service.follow(["users"], lambda s, found: seen.append(tuple(i.id for i in found)))
    )
    try:
        await store.register(Instance("users", "a", "127.0.0.1", 8001))
        await until("a reported", lambda: seen == [("a",)])
        store.frozen = await store.instances("users")  # the copy stops at a
        listed = store.listings
        await store.register(Instance("users", "b", "127.0.0.1", 8002))
        await until("the loop listed the old copy", lambda: store.listings > listed)
        store.frozen = None  # the copy catches up; no further change comes
        await until("b reported", lambda: seen == [("a",), ("a", "b")])
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
