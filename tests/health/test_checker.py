"""GroupChecker: the start-up round, per-backend schedules, publishing, history, cancellation.

Schedules are tested with an injected sleep (no waiting, exact delays); the rest against real
servers on 127.0.0.1, polling conditions with generous deadlines.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.integration.support import eventually

from poise.config.model import HealthCheckConfig
from poise.health.checker import GroupChecker, Probe, Sleep, next_wait
from poise.health.probes import probe as probe_backend
from poise.health.state import ProbeResult
from poise.models import Backend
from poise.testing import HttpBackend, RecordedRequest, Response

Published = list[tuple[str, tuple[bool, ...]]]


def backend_for(url: str, index: int = 0) -> Backend:
    host, port = url.split("//")[1].rsplit(":", 1)
    return Backend(id=f"{host}:{port}", scheme="http", host=host, port=int(port), index=index,
                   authority=f"{host}:{port}")  # fmt: skip


def fake_backends(n: int) -> tuple[Backend, ...]:
    return tuple(backend_for(f"http://127.0.0.1:{9000 + i}", i) for i in range(n))


def checker_for(
    backends: tuple[Backend, ...],
    hc: HealthCheckConfig,
    published: Published,
    *,
    sleep: Sleep = asyncio.sleep,
    probe: Probe = probe_backend,
) -> GroupChecker:
    return GroupChecker(
        "g", backends, hc, lambda g, up: published.append((g, up)), random.Random(7),
        sleep=sleep, probe=probe,
    )  # fmt: skip


async def finish(task: asyncio.Task[None]) -> None:
    """Cancel ``run()`` and check it ends by cancellation, not by an error."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def health_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("health:") and not t.done()]


class FakeSleep:
    """Records each wait and returns at once; after ``park_after`` waits it blocks forever."""

    def __init__(self, park_after: int) -> None:
        self.delays: list[float] = []
        self.park_after = park_after
        self.parked = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= self.park_after:
            self.parked.set()
            await asyncio.Event().wait()  # until run() is cancelled
        await asyncio.sleep(0)


def scripted_probe(results: Iterator[bool]) -> Probe:
    async def fake(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
        ok = next(results)
        return ProbeResult(ok=ok, reason="status 200" if ok else "status 500")

    return fake


# -- jitter ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("up", "base"), [(True, 10.0), (False, 0.5)])
def test_next_wait_stays_within_jitter_of_its_own_interval(up: bool, base: float) -> None:
    hc = HealthCheckConfig(interval=10.0, unhealthy_interval=0.5, jitter=0.2)
    rng = random.Random(1)
    waits = [next_wait(hc, up, rng) for _ in range(2000)]
    assert all(base * 0.8 <= w <= base * 1.2 for w in waits)
    # spread over (nearly) the whole band, on both sides: jitter is really applied
    assert min(waits) < base * 0.82
    assert max(waits) > base * 1.18
    # deterministic for a seed: the rng passed in is the only source of randomness
    assert waits[:5] == [next_wait(hc, up, r) for r in [random.Random(1)] for _ in range(5)]


def test_next_wait_without_jitter_or_unhealthy_interval() -> None:
    rng = random.Random(1)
    hc = HealthCheckConfig(interval=3.0, jitter=0.0)
    assert {next_wait(hc, up, rng) for up in (True, False) for _ in range(50)} == {3.0}
    hc = HealthCheckConfig(interval=3.0, jitter=0.0, unhealthy_interval=0.25)
    assert next_wait(hc, True, rng) == 3.0
    assert next_wait(hc, False, rng) == 0.25


# -- schedule (fake sleep and probe) --------------------------------------------------------


async def test_down_backend_waits_unhealthy_interval_and_up_backend_interval() -> None:
    hc = HealthCheckConfig(interval=10.0, unhealthy_interval=0.5, jitter=0.1, rise=1, fall=1)
    # start-up probe, then one probe after each wait
    results = iter([True, False, False, True, True, False, True])
    sleep = FakeSleep(park_after=6)
    published: Published = []
    checker = checker_for(
        fake_backends(1), hc, published, sleep=sleep, probe=scripted_probe(results)
    )
    task = asyncio.create_task(checker.run())
    async with asyncio.timeout(5):
        await sleep.parked.wait()
    await finish(task)
    # health before each wait: UP, DOWN, DOWN, UP, UP, DOWN
    bases = [10.0, 0.5, 0.5, 10.0, 10.0, 0.5]
    assert len(sleep.delays) == len(bases)
    for delay, base in zip(sleep.delays, bases, strict=True):
        assert base * 0.9 <= delay <= base * 1.1, (delay, base)
    assert len(set(sleep.delays)) == len(bases)  # jittered, not constant
    assert published == [("g", (True,)), ("g", (False,)), ("g", (True,)), ("g", (False,))]
    assert checker.probes == [6]
    assert checker.rounds == 1


async def test_first_round_probes_every_backend_at_once_and_publishes_once() -> None:
    n = 4
    started = 0
    all_started = asyncio.Event()

    async def fake(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
        nonlocal started
        started += 1
        if started == n:
            all_started.set()
        await all_started.wait()  # deadlocks (-> timeout) unless all probes run together
        return ProbeResult(ok=backend.index % 2 == 0, reason=f"probe {backend.index}")

    published: Published = []
    checker = checker_for(fake_backends(n), HealthCheckConfig(), published, probe=fake)
    assert not checker.first_round.is_set()
    async with asyncio.timeout(5):
        await checker.check_once()
    assert checker.first_round.is_set()
    assert published == [("g", (True, False, True, False))]
    assert checker.rounds == 1


# -- real servers ---------------------------------------------------------------------------


async def test_publishes_on_first_round_and_on_change_only() -> None:
    published: Published = []
    async with HttpBackend() as a, HttpBackend() as b:
        backends = (backend_for(a.url, 0), backend_for(b.url, 1))
        checker = checker_for(backends, HealthCheckConfig(), published)
        await checker.check_once()
        await checker.check_once()
        assert published == [("g", (True, True))]
        await b.stop()
        await checker.check_once()
        assert published[-1] == ("g", (True, False))
        assert len(published) == 2
        assert checker.states[1].reason == "connect refused"
        assert repr(checker) == "GroupChecker(g, 1/2 up)"


async def test_recovered_backend_seen_quickly_while_healthy_one_is_left_alone() -> None:
    hc = HealthCheckConfig(interval=10.0, unhealthy_interval=0.05, timeout=1.0)
    published: Published = []
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        await b.stop()  # b is dead at start-up; its port stays known for the restart
        checker = checker_for((backend_for(a.url, 0), backend_for(b.url, 1)), hc, published)
        task = asyncio.create_task(checker.run())
        try:
            async with asyncio.timeout(5):
                await checker.first_round.wait()
            assert published == [("g", (True, False))]
            # DOWN: probed again and again, far more often than the 10 s interval
            await eventually(lambda: checker.probes[1] >= 4)
            await b.start()
            await eventually(lambda: checker.states[1].up)
            assert published == [("g", (True, False)), ("g", (True, True))]
            assert checker.states[1].reason == "status 200"
            # UP again: back on the 10 s interval. This wait can only hide a failure (a too
            # late check), never cause a spurious one.
            probes_b = checker.probes[1]
            await asyncio.sleep(0.25)
            assert checker.probes[1] == probes_b
            # the healthy backend was probed once, at start-up, and never since
            assert checker.probes[0] == 1
            assert len(a.requests) == 1
        finally:
            await finish(task)


async def test_history_in_statistics() -> None:
    calls = 0

    async def alternating(_: RecordedRequest) -> Response:
        nonlocal calls
        calls += 1
        return Response(status=200 if calls % 2 else 500)

    hc = HealthCheckConfig(history=3)
    async with HttpBackend(handler=alternating) as b:
        backend = backend_for(b.url)
        checker = checker_for((backend,), hc, [])
        before = time.time()
        for _ in range(5):  # 200, 500, 200, 500, 200
            await checker.check_once()
        after = time.time()
    stats: Any = checker.statistics()  # JSON-shaped: index it freely
    assert stats["rounds"] == 5
    assert stats["probes"] == 5
    entry = stats["backends"][backend.url]
    assert entry["health"] == "up"
    assert entry["reason"] == "status 200"
    assert entry["probes"] == 5
    history = entry["history"]
    assert [(h["ok"], h["reason"]) for h in history] == [
        (True, "status 200"),
        (False, "status 500"),
        (True, "status 200"),
    ]
    for h in history:
        assert set(h) == {"ok", "reason", "latency_ms", "at"}
        assert 0 < h["latency_ms"] < (after - before) * 1000 + 1
        assert before - 0.001 <= h["at"] <= after + 0.001  # rounded to the millisecond
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelling_run_during_the_first_round_cancels_the_probes() -> None:
    n = 3
    started = cancelled = 0

    async def hang(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
        nonlocal started, cancelled
        started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        raise AssertionError("unreachable")

    checker = checker_for(fake_backends(n), HealthCheckConfig(), [], probe=hang)
    task = asyncio.create_task(checker.run())
    await eventually(lambda: started == n)
    await finish(task)
    assert cancelled == n
    assert not checker.first_round.is_set()


async def test_cancelling_run_ends_every_backend_loop() -> None:
    async with HttpBackend() as a, HttpBackend() as b:
        backends = (backend_for(a.url, 0), backend_for(b.url, 1))
        checker = checker_for(backends, HealthCheckConfig(interval=60.0), [])
        task = asyncio.create_task(checker.run())
        await eventually(lambda: len(health_tasks()) == 2)  # one loop per backend, sleeping
        await finish(task)
        assert health_tasks() == []


async def test_every_passing_probe_is_reported_with_its_start_time() -> None:
    passed: list[tuple[str, int, float]] = []

    async def probe(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
        ok = backend.index == 0  # backend 0 passes, backend 1 fails
        return ProbeResult(ok=ok, reason="status 200" if ok else "status 500")

    sleep = FakeSleep(park_after=5)
    checker = GroupChecker(
        "g", fake_backends(2), HealthCheckConfig(), lambda g, up: None, random.Random(1),
        sleep=sleep, probe=probe, passed=lambda *p: passed.append(p),
    )  # fmt: skip
    before = time.monotonic()
    task = asyncio.create_task(checker.run())
    try:
        await sleep.parked.wait()
        await eventually(lambda: sum(checker.probes) == 6)  # 2 at start-up + 4 after waits
        assert {(g, i) for g, i, _ in passed} == {("g", 0)}
        assert len(passed) == checker.probes[0] >= 2
        starts = [started for _, _, started in passed]
        assert before <= starts[0] and starts == sorted(starts) and starts[-1] <= time.monotonic()
    finally:
        await finish(task)
