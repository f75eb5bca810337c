"""Runs the active checks of one upstream group on a schedule and reports health changes.

Probes of one round run concurrently; a round starts every ``interval`` (±10% jitter, so
several groups or workers do not probe in lockstep). The first round runs at start-up.
Decisions are made by ``HealthState``; this module only schedules and reports.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from poise.config.model import HealthCheckConfig
from poise.health.probes import probe
from poise.health.state import Health, HealthState
from poise.models import Backend

log = logging.getLogger("poise.health")

# (group name, health by backend index)
Publish = Callable[[str, tuple[bool, ...]], None]


class GroupChecker:
    def __init__(
        self,
        group: str,
        backends: tuple[Backend, ...],
        hc: HealthCheckConfig,
        publish: Publish,
        rng: random.Random,
    ) -> None:
        self.group = group
        self.backends = backends
        self.hc = hc
        self.publish = publish
        self.rng = rng
        self.states = [HealthState(rise=hc.rise, fall=hc.fall) for _ in backends]
        self.rounds = 0
        self.first_round = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self.check_once()
            jitter = self.hc.interval * 0.1
            await asyncio.sleep(self.hc.interval + self.rng.uniform(-jitter, jitter))

    async def check_once(self) -> None:
        results = await asyncio.gather(*(probe(b, self.hc) for b in self.backends))
        changed = False
        for backend, state, result in zip(self.backends, self.states, results, strict=True):
            new = state.observe(result)
            if new is not None:
                changed = True
                level = logging.WARNING if new is Health.DOWN else logging.INFO
                log.log(
                    level,
                    "backend %s in %s is %s: %s",
                    backend.url,
                    self.group,
                    new.value.upper(),
                    result.reason,
                    extra={"group": self.group, "backend": backend.url, "health": new.value},
                )
        self.rounds += 1
        if changed or self.rounds == 1:
            self.publish(self.group, tuple(s.up for s in self.states))
        self.first_round.set()

    def statistics(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "backends": {
                b.url: {"health": s.health.value, "reason": s.reason}
                for b, s in zip(self.backends, self.states, strict=True)
            },
        }

    def __repr__(self) -> str:
        up = sum(s.up for s in self.states)
        return f"GroupChecker({self.group}, {up}/{len(self.states)} up)"
