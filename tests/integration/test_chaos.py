"""Backends that really die: SIGKILLed processes (poise.testing.procs) under a steady request
loop through an in-process poise. Clients must not notice: 0 failed requests.

The kill/restart schedule is the experiment itself (a backend dies every 2 s), not a wait
for something to happen; every "until" below polls a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.testing.procs import BackendProcess, free_port
from tests.integration.support import eventually, full, running

pytestmark = pytest.mark.timeout(90)

CLIENTS = 4  # concurrent request loops
HEALTH = {"interval": "0.5s", "timeout": "0.4s", "unhealthy_interval": "0.2s"}


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[list[BackendProcess]]:
    procs = [BackendProcess(free_port(), tmp_path / f"b{i}.log", f"b{i}") for i in (1, 2, 3)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


@dataclass
class Load:
    """CLIENTS loops of keep-alive GETs; every failure is kept with what went wrong."""

    url: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    by_backend: dict[str, int] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _loop(self, n: int) -> None:
        timeout = httpx.Timeout(10.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                target = f"{self.url}/c{n}/{i}"
                try:
                    r = await client.get(target)
                except httpx.HTTPError as exc:
                    self.failures.append(f"GET {target}: {type(exc).__name__} {exc}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"GET {target}: {r.status_code} {r.text!r}")
                else:
                    self.ok += 1
                    name = r.headers["x-backend"]
                    self.by_backend[name] = self.by_backend.get(name, 0) + 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._loop(n)) for n in range(CLIENTS)]
        try:
            await eventually(lambda: self.ok >= 20)  # the loop is under way
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)

    def served(self) -> dict[str, int]:
        return dict(self.by_backend)


def config(procs: list[BackendProcess], **upstream: Any) -> dict[str, Any]:
    doc = full([p.url for p in procs], health=HEALTH)
    doc["upstreams"]["app"].update(upstream)
    return doc


async def serves_again(load: Load, name: str, timeout: float = 20.0) -> None:
    """Wait until requests reach backend ``name`` again (poise routes to it)."""
    before = load.by_backend.get(name, 0)
    await eventually(lambda: load.by_backend.get(name, 0) > before + 5, timeout)


async def test_kill_9_one_of_three_every_2s_and_restart_fails_no_request(
    backends: list[BackendProcess],
) -> None:
    async with running(config(backends)) as (server, url), Load(url).running() as load:
        kills = 0
        for victim in backends + backends[:1]:  # four kills, every backend at least once
            started = time.monotonic()
            await asyncio.to_thread(victim.kill)
            kills += 1
            assert victim.returncode == -9
            await asyncio.sleep(1.0)  # the schedule: down for 1 s ...
            await asyncio.to_thread(victim.start)
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - started)))  # ... every 2 s
        for p in backends:  # and every one of them is routed to again afterwards
            await serves_again(load, p.name)
    assert kills == 4
    assert load.failures == [], f"{len(load.failures)} failed of {load.ok}: {load.failures[:5]}"
    assert load.ok >= 200
    # the backends really died under load: poise had to retry or eject to get here
    assert server.ctx is not None
    assert server.ctx.stats.retries + server.ctx.stats.ejections > 0


async def test_rolling_restart_of_all_three_fails_no_request(
    backends: list[BackendProcess],
) -> None:
    async with running(config(backends)) as (_, url), Load(url).running() as load:
        for p in backends:
            old = p.pid
            await asyncio.to_thread(p.restart)  # kill -9, then start at once on the same port
            assert p.pid != old
            await serves_again(load, p.name)  # the next one goes only once this one serves
    assert load.failures == [], f"{len(load.failures)} failed of {load.ok}: {load.failures[:5]}"
    assert set(load.served()) == {"b1", "b2", "b3"}


async def test_post_to_a_backend_that_dies_after_reading_gets_502_and_one_delivery(
    tmp_path: Path,
) -> None:
    dier = BackendProcess(free_port(), tmp_path / "dier.log", "dier", die_after_read=True)
    other = BackendProcess(free_port(), tmp_path / "other.log", "other")
    try:
        dier.start()
        other.start()
        doc = config([dier, other], policy="first")  # the POST goes to the dying one first
        async with running(doc) as (_, url), httpx.AsyncClient(timeout=10.0) as client:
            r = await client.post(
                url + "/orders", content=b"one order", headers={"X-Request-Id": "order-1"}
            )
        assert r.status_code == 502
        assert "127.0.0.1" not in r.text  # no backend address in the error body
        await asyncio.to_thread(lambda: dier._proc and dier._proc.wait(5))
        assert dier.returncode == -9
        posts = [d for d in dier.deliveries() if d.startswith("POST")]
        assert posts == ["POST /orders order-1"]  # delivered exactly once ...
        assert [d for d in other.deliveries() if d.startswith("POST")] == []  # ... and only there
    finally:
        dier.stop()
        other.stop()
