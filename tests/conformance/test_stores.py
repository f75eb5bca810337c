"""Every registry Store passes the conformance kit (poise.testing.stores), check by check."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from uuid import uuid4

import pytest

from poise.registry import MemoryStore, SQLiteStore, Store
from poise.testing import FakeClock
from poise.testing.etcd import EtcdServer
from poise.testing.stores import STORE_CHECKS, StoreKit, run_check

Check = Callable[[StoreKit, Store], Awaitable[None]]
CHECKS = pytest.mark.parametrize("check", STORE_CHECKS, ids=lambda c: c.__name__)


@CHECKS
async def test_memory_store(check: Check) -> None:
    clock = FakeClock(1_000_000.0)

    async def make() -> Store:
        return MemoryStore(clock=clock)

    await run_check(StoreKit(make, clock), check)


@CHECKS
async def test_sqlite_store(check: Check, tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    path = tmp_path / "registry.db"

    async def make() -> Store:
        return SQLiteStore(path, clock=clock)

    async def reopen(store: Store) -> Store:
        await store.close()
        return SQLiteStore(path, clock=clock)

    await run_check(StoreKit(make, clock, reopen), check)


@CHECKS
@pytest.mark.timeout(60)
async def test_etcd_store(check: Check, etcd: EtcdServer) -> None:
    from poise.registry.etcd import EtcdStore

    prefix = f"/poise-test/{uuid4().hex[:8]}"  # a fresh, empty store for each check
    clock = FakeClock(1_000_000.0)  # instance TTLs are held by the node, on its clock

    async def make() -> Store:
        return EtcdStore(etcd.url, prefix=prefix, node="conformance", clock=clock)

    async def reopen(store: Store) -> Store:  # a poise restart: etcd keeps everything
        await store.close()
        return await make()

    try:
        await run_check(StoreKit(make, clock=clock, reopen=reopen, ttl=2.0), check)
    finally:
        etcd.clear()  # leases left by this check must not expire during the next one
