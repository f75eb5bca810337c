"""Request limits of one upstream group: per-backend and per-group concurrency, and the bounded
queue of requests waiting for a free slot (HAProxy's ``maxconn`` + ``timeout queue``; Envoy's
circuit breakers ``max_requests`` / ``max_pending_requests``).

Admission never picks backends and never speaks HTTP: the proxy asks ``has_room`` before it
sends a request, counts it in and out, and parks a request that found no room here. When a
request ends, the oldest waiter is handed back to its owner (on the next loop iteration, so a
response completing never re-enters the proxy half-way). Waiters past ``queue_timeout`` are
expired by the owner's timer sweep.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from poise.config.model import UpstreamLimitsConfig


class Waiter(Protocol):
    def resume(self) -> None:
        """Try to dispatch again (there may be room now)."""

    def expire(self) -> None:
        """Waited too long: answer 503."""

    def gone(self) -> bool:
        """The client went away: drop it from the queue."""


class Admission:
    __slots__ = (
        "_call_soon",
        "_scheduled",
        "active",
        "cfg",
        "full",
        "label",
        "per_backend",
        "queue_timeouts",
        "waiting",
    )

    def __init__(
        self,
        label: str,
        cfg: UpstreamLimitsConfig,
        call_soon: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.label = label
        self.cfg = cfg
        self.per_backend = cfg.max_requests_per_backend
        self.active = 0  # requests in flight in the group
        self.waiting: deque[tuple[float, Waiter]] = deque()
        self._call_soon = call_soon or (lambda f: f())
        self._scheduled = False
        self.full = 0  # refused: queue full
        self.queue_timeouts = 0

    def set_scheduler(self, call_soon: Callable[[Callable[[], None]], object]) -> None:
        self._call_soon = call_soon

    def group_full(self) -> bool:
        return 0 < self.cfg.max_requests <= self.active

    def backend_full(self, active: int) -> bool:
        return 0 < self.per_backend <= active

    def park(self, waiter: Waiter, now: float) -> bool:
        """Queue ``waiter``; False when the queue is full (the caller answers 503)."""
        if len(self.waiting) >= self.cfg.max_pending:
            self.full += 1
            return False
        self.waiting.append((now + self.cfg.queue_timeout, waiter))
        return True

    def park_first(self, waiter: Waiter, deadline: float) -> None:
        """Back to the head of the queue: it was woken but someone else took the slot."""
        self.waiting.appendleft((deadline, waiter))

    def released(self) -> None:
        """A request of this group ended: its slot may serve the oldest waiter."""
        self.active -= 1
        if self.waiting and not self._scheduled:
            self._scheduled = True
            self._call_soon(self._wake)

    def _wake(self) -> None:
        self._scheduled = False
        while self.waiting:
            _, waiter = self.waiting.popleft()
            if not waiter.gone():
                waiter.resume()
                return

    def expire(self, now: float) -> None:
        waiting = self.waiting
        while waiting and (waiting[0][0] < now or waiting[0][1].gone()):
            _, waiter = waiting.popleft()
            if not waiter.gone():
                self.queue_timeouts += 1
                waiter.expire()

    def statistics(self) -> dict[str, int]:
        return {
            "active": self.active,
            "waiting": len(self.waiting),
            "refused_queue_full": self.full,
            "queue_timeouts": self.queue_timeouts,
        }

    def __repr__(self) -> str:
        return f"Admission({self.label}, active={self.active}, waiting={len(self.waiting)})"
