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

from collections import deque
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
    at: float = 0.0  # wall-clock time (Unix seconds) when the probe finished, for display

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-ready form, for the admin API."""
        return {
            "ok": self.ok,
            "reason": self.reason,
            "latency_ms": round(self.latency * 1000, 3),
            "at": round(self.at, 3),
        }


@dataclass(slots=True)
class HealthState:
    rise: int
    fall: int
    health: Health = Health.UP
    successes: int = 0
    failures: int = 0
    last: ProbeResult | None = None
    reason: str = "not checked yet"
    # the last ``history_size`` results, oldest first (health_check.history)
    history: deque[ProbeResult] = field(default_factory=deque)
    history_size: int = 10

    def __post_init__(self) -> None:
        if self.history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {self.history_size}")
        self.history = deque(self.history, maxlen=self.history_size)

    def observe(self, result: ProbeResult) -> Health | None:
        """Fold one probe result in. Returns the new Health when it changed, else None."""
        self.last = result
        self.history.append(result)  # the deque's maxlen drops the oldest
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

    def history_dicts(self) -> list[dict[str, object]]:
        """The kept results, oldest first, as ``{"ok", "reason", "latency_ms", "at"}`` dicts."""
        return [result.as_dict() for result in self.history]
