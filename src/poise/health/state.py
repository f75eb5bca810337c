"""Rise/fall counting for active health checks. Pure: no I/O, no clock.

Theory of operation
-------------------
A backend is UP or DOWN. Each probe result is a success or a failure with a reason.
``fall`` consecutive failures take an UP backend DOWN; ``rise`` consecutive successes bring a
DOWN backend UP. A result that agrees with the current state resets the opposite streak, so
flapping results never accumulate across a good/bad boundary (HAProxy's counting).

Invariants:
- ``successes`` and ``failures`` are never both non-zero;
- UP => failures < fall; DOWN => successes < rise.

A backend starts UP: the first check runs at start-up, and with the seed's fall=1 a dead
backend is taken out after that one probe, while a live one never sees a 503 window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Health(Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # "status 200", "connect refused", "timeout 1s", ...
    latency: float = 0.0  # seconds
    at: float = 0.0  # clock reading when the probe finished


@dataclass(slots=True)
class HealthState:
    rise: int
    fall: int
    health: Health = Health.UP
    successes: int = 0
    failures: int = 0
    last: ProbeResult | None = None
    reason: str = "not checked yet"
    history: list[ProbeResult] = field(default_factory=list)
    history_size: int = 10

    def observe(self, result: ProbeResult) -> Health | None:
        """Fold one probe result in. Returns the new Health when it changed, else None."""
        self.last = result
        self.history.append(result)
        if len(self.history) > self.history_size:
            del self.history[0]
        if result.ok:
            self.failures = 0
            self.successes += 1
            if self.health is Health.DOWN:
                if self.successes >= self.rise:
                    self.successes = 0
                    self.health = Health.UP
                    self.reason = result.reason
                    return Health.UP
            else:
                self.successes = 0
                self.reason = result.reason
        else:
            self.successes = 0
            self.failures += 1
            if self.health is Health.UP:
                if self.failures >= self.fall:
                    self.failures = 0
                    self.health = Health.DOWN
                    self.reason = result.reason
                    return Health.DOWN
            else:
                self.failures = 0
                self.reason = result.reason
        return None

    @property
    def up(self) -> bool:
        return self.health is Health.UP
