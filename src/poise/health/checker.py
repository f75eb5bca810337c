"""Runs the active checks of one upstream group on a schedule and reports health changes.

Theory of operation
-------------------
At start-up every backend is probed once, all together (``check_once``); ``first_round`` is
set when they are done, and the server waits for it before accepting traffic, so a dead
backend is known dead before the first request.

Then each backend has its own loop (one task per backend, in a TaskGroup owned by ``run``):
wait, probe, fold the result into its ``HealthState``. The wait is ``interval`` while the
backend is UP and ``unhealthy_interval`` (default: ``interval``) while it is DOWN, so a short
retry interval brings a recovered backend back quickly without probing healthy ones more
often. Every wait is spread by ± ``jitter`` of itself, so the backends of a group, the groups
and the workers drift apart instead of probing in lockstep. A wait starts when the previous
probe has ended, so probes of one backend never overlap (and timeout <= interval keeps the
cadence close to the configured one).

Decisions are made by ``HealthState``; this module only schedules and reports. ``publish``
receives the whole group's health, by backend index, after the first round and whenever a
backend's health changes; ``passed`` (optional) hears of every passing probe with its start
time on the ``time.monotonic`` clock, so passive ejections can be ended by fresh evidence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from poise.config.model import HealthCheckConfig
from poise.health.probes import probe as probe_backend
from poise.health.state import Health, HealthState, ProbeResult
from poise.models import Backend

log = logging.getLogger("poise.health")

# (group name, health by backend index)
Publish = Callable[[str, tuple[bool, ...]], None]
Sleep = Callable[[float], Awaitable[None]]
Probe = Callable[[Backend, HealthCheckConfig], Coroutine[Any, Any, ProbeResult]]
# (group name, backend index, when the passing probe started)
Passed = Callable[[str, int, float], None]


def next_wait(hc: HealthCheckConfig, up: bool, rng: random.Random) -> float:
    """Seconds until a backend's next probe: its interval ± ``jitter`` of that interval."""
    base = hc.interval if up or hc.unhealthy_interval is None else hc.unhealthy_interval
    spread = base * hc.jitter  # jitter < 1 (validated), so the wait stays positive
    return base + rng.uniform(-spread, spread)


class GroupChecker:
    def __init__(
        self,
        group: str,
        backends: tuple[Backend, ...],
        hc: HealthCheckConfig,
        publish: Publish,
        rng: random.Random,
        *,
        sleep: Sleep = asyncio.sleep,
        probe: Probe = probe_backend,
        passed: Passed | None = None,
        states: list[HealthState] | None = None,
    ) -> None:
        self.group = group
        self.backends = backends
        self.hc = hc
        self.publish = publish
        self.rng = rng
        self.sleep = sleep  # injectable, so tests can drive the schedule without waiting
        self.probe = probe
        self.passed = passed
        # ``states`` carries health over when a group's membership changes (one per backend)
        self.states = (
            states
            if states is not None
            else [
                HealthState(rise=hc.rise, fall=hc.fall, history_size=hc.history) for _ in backends
            ]
        )
        if len(self.states) != len(backends):
            raise ValueError(f"{len(self.states)} health states for {len(backends)} backends")
        self.probes = [0] * len(backends)  # probes done, by backend index
        self.failed = [0] * len(backends)  # of which failed
        self.rounds = 0  # start-up rounds (check_once calls) done
        self.first_round = asyncio.Event()

    async def run(self) -> None:
        """Probe until cancelled. Cancelling ``run`` cancels (and awaits) every probe loop."""
        await self.check_once()
        async with asyncio.TaskGroup() as tg:
            for i, backend in enumerate(self.backends):
                tg.create_task(self._watch(i), name=f"health:{self.group}:{backend.url}")

    async def check_once(self) -> None:
        """Probe every backend once, all together; publish if any changed (or if first)."""
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.probe(b, self.hc)) for b in self.backends]
        changed = [self._observe(i, task.result(), started) for i, task in enumerate(tasks)]
        self.rounds += 1
        if any(changed) or self.rounds == 1:
            self._publish()
        self.first_round.set()

    async def _watch(self, i: int) -> None:
        backend, state = self.backends[i], self.states[i]
        while True:
            await self.sleep(next_wait(self.hc, state.up, self.rng))
            started = time.monotonic()
            if self._observe(i, await self.probe(backend, self.hc), started):
                self._publish()

    def _observe(self, i: int, result: ProbeResult, started: float) -> bool:
        """Fold backend ``i``'s result in; True when its health changed (then logged)."""
        self.probes[i] += 1
        if not result.ok:
            self.failed[i] += 1
        new = self.states[i].observe(result)
        if result.ok and self.passed is not None:
            self.passed(self.group, i, started)
        if new is None:
            return False
        url = self.backends[i].url
        level = logging.WARNING if new is Health.DOWN else logging.INFO
        log.log(
            level,
            "backend %s in %s is %s: %s",
            url,
            self.group,
            new.value.upper(),
            result.reason,
            extra={"group": self.group, "backend": url, "health": new.value},
        )
        return True

    def _publish(self) -> None:
        self.publish(self.group, tuple(s.up for s in self.states))

    def statistics(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "probes": sum(self.probes),
            "backends": {
                b.url: {
                    "health": s.health.value,
                    "reason": s.reason,
                    "probes": n,
                    "history": s.history_dicts(),
                }
                for b, s, n in zip(self.backends, self.states, self.probes, strict=True)
            },
        }

    def __repr__(self) -> str:
        up = sum(s.up for s in self.states)
        return f"GroupChecker({self.group}, {up}/{len(self.states)} up)"
