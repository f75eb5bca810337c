"""Every registry Store passes the conformance kit (poise.testing.stores), check by check."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from poise.registry import MemoryStore, SQLiteStore, Store
from poise.testing import FakeClock
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
