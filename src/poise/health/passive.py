"""Passive health: outlier ejection from what live traffic sees. Pure: the clock reading comes
in as an argument, nothing here sleeps or schedules.

Theory of operation
-------------------
The proxy reports each request's outcome for the backend that served it. A failure is a
connect error, a connection lost before the response ended, a response timeout, a malformed
response, or a status listed in ``passive.statuses``. ``consecutive_failures`` failures in a
row eject the backend (Envoy's consecutive-errors detector); any success resets the streak.

The n-th ejection of a backend lasts ``base_ejection * n``, capped at ``max_ejection``, so a
backend that keeps failing as soon as it returns is kept out longer each time. A backend that
then stays in service for ``max_ejection`` has its count forgiven.

Never more than ``max_ejected_percent`` of a group is ejected at once (at least one backend
may always be, unless the percentage is 0): ejection protects clients from a bad backend; it
must not take a whole struggling fleet out.

A 503 carrying ``Retry-After`` is the backend saying when to come back: it is ejected for that
long (capped at ``max_ejection``; the ejection share limit applies too).

An ejection for connection-level failures (connect errors, resets, timeouts, malformed
responses) ends early when an active health probe that *started after the ejection* passes:
the probe has just shown the backend accepting connections and answering, which is what those
failures doubted (Envoy un-ejects on a passing active check too). A backend restarted within
one check interval is otherwise kept out for ``base_ejection`` though it is fine. Ejections for
response statuses or Retry-After are not lifted this way: a health endpoint answering 200 says
nothing about the 5xx the real requests got, and Retry-After is the backend's own request.

Invariants: ``ejected[i]`` <=> ``until[i] > 0``; ``streak[i] == 0`` while ejected.
"""

from __future__ import annotations

import math

from poise.config.model import PassiveConfig


class Outliers:
    __slots__ = (
        "any_streak",
        "cfg",
        "count",
        "ejected",
        "ejections",
        "liftable",
        "n",
        "reasons",
        "returned",
        "since",
        "statuses",
        "streak",
        "until",
    )

    def __init__(self, n: int, cfg: PassiveConfig) -> None:
        self.n = n
        self.cfg = cfg
        self.streak = [0] * n  # consecutive failures
        self.any_streak = False  # some streak is non-zero: successes must reset it
        self.ejected = [False] * n
        self.until = [0.0] * n  # ejection end, 0 when not ejected
        self.since = [0.0] * n  # ejection start
        self.liftable = [False] * n  # a passing active probe may end the ejection early
        self.count = [0] * n  # ejections so far (the multiplier)
        self.returned = [0.0] * n  # when the last ejection ended
        self.reasons = [""] * n
        self.ejections = 0  # in total, for statistics
        self.statuses = frozenset(
            code for lo, hi in cfg.statuses for code in range(lo, hi + 1)
        )  # response statuses that count as failures

    def success(self, i: int) -> None:
        self.streak[i] = 0
        self.any_streak = any(self.streak)

    def failure(self, i: int, now: float, reason: str, *, connection: bool = True) -> bool:
        """Count a failure of backend ``i``; True when this ejected it. ``connection`` is
        False for a failure status (the ejection is then not lifted by an active probe)."""
        if self.ejected[i] or not self.cfg.enabled:
            return False
        self.streak[i] += 1
        self.any_streak = True
        if self.streak[i] < self.cfg.consecutive_failures:
            return False
        self._forgive(i, now)
        duration = min(self.cfg.base_ejection * (self.count[i] + 1), self.cfg.max_ejection)
        why = f"{self.streak[i]} consecutive failures ({reason})"
        return self._eject(i, now, duration, why, liftable=connection)

    def retry_after(self, i: int, now: float, seconds: float) -> bool:
        """A 503 with Retry-After: eject ``i`` for ``seconds`` (capped); True when ejected."""
        if self.ejected[i] or not self.cfg.enabled or not self.cfg.retry_after or seconds <= 0:
            return False
        seconds = min(seconds, self.cfg.max_ejection)
        why = f"503 with Retry-After {seconds:g}s"
        return self._eject(i, now, seconds, why, liftable=False)

    def probe_passed(self, i: int, started: float, now: float) -> bool:
        """An active probe of ``i`` that began at ``started`` passed: end a connection-level
        ejection that began before the probe did. True when ``i`` is back in service."""
        if not (self.ejected[i] and self.liftable[i] and started >= self.since[i]):
            return False
        self.reinstate(i, now)
        return True

    def _eject(self, i: int, now: float, duration: float, reason: str, *, liftable: bool) -> bool:
        limit = math.floor(self.n * self.cfg.max_ejected_percent / 100)
        if self.cfg.max_ejected_percent > 0:
            limit = max(limit, 1)
        if sum(self.ejected) >= limit:
            return False  # keep counting: it is ejected once the share allows
        self.streak[i] = 0
        self.any_streak = any(self.streak)
        self.ejected[i] = True
        self.until[i] = now + duration
        self.since[i] = now
        self.liftable[i] = liftable
        self.count[i] += 1
        self.ejections += 1
        self.reasons[i] = f"ejected for {duration:g}s: {reason}"
        return True

    def _forgive(self, i: int, now: float) -> None:
        if self.count[i] and now - self.returned[i] >= self.cfg.max_ejection:
            self.count[i] = 0

    def expire(self, now: float) -> list[int]:
        """End the ejections that are due; the indices that returned."""
        back = [i for i in range(self.n) if self.ejected[i] and self.until[i] <= now]
        for i in back:
            self.reinstate(i, now)
        return back

    def reinstate(self, i: int, now: float) -> None:
        """Back in service (the ejection ended, or an active check saw it recover)."""
        if self.ejected[i]:
            self.ejected[i] = False
            self.until[i] = 0.0
            self.liftable[i] = False
            self.returned[i] = now
            self.reasons[i] = ""

    def remap(self, cfg: PassiveConfig, sources: list[int | None]) -> Outliers:
        """A successor for new membership: backend ``k`` of the new group takes the state of
        old backend ``sources[k]`` (None: a newcomer, clean)."""
        new = Outliers(len(sources), cfg)
        for k, j in enumerate(sources):
            if j is None:
                continue
            new.streak[k] = self.streak[j]
            new.ejected[k] = self.ejected[j]
            new.until[k] = self.until[j]
            new.since[k] = self.since[j]
            new.liftable[k] = self.liftable[j]
            new.count[k] = self.count[j]
            new.returned[k] = self.returned[j]
            new.reasons[k] = self.reasons[j]
        new.any_streak = any(new.streak)
        new.ejections = self.ejections
        return new

    def next_expiry(self) -> float | None:
        due = [u for u in self.until if u > 0]
        return min(due) if due else None

    def describe(self, i: int, now: float) -> dict[str, object]:
        return {
            "ejected": self.ejected[i],
            "ejected_for": round(max(self.until[i] - now, 0.0), 3) if self.ejected[i] else 0,
            "ejections": self.count[i],
            "consecutive_failures": self.streak[i],
            "reason": self.reasons[i],
        }

    def __repr__(self) -> str:
        return f"Outliers({sum(self.ejected)}/{self.n} ejected)"
