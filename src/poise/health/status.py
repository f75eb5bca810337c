"""Which backends of a group take requests: the facts folded into one view. Pure: the clock
reading comes in as an argument.

Theory of operation
-------------------
Four independent facts per backend:

* ``healthy``: the active checks' verdict (``state.HealthState``);
* ``ejected``: passive health, from live traffic (``passive.Outliers``);
* ``admin``: the operator's state, separate from health (pingora's ``set_enable``):
  ``enabled``; ``drain`` (no new requests, but clients pinned by a sticky cookie still reach
  it and in-flight requests finish); ``maint`` (no requests at all);
* ``since``: when it last became usable, for slow start;
* ``reported``: what the service registry says (False when the instance reports itself
  ``critical``); always True for backends from the config file.

A backend is *usable* when enabled, healthy, reported fine and not ejected.

Membership changes (instances registering and leaving) make a *successor* status: a backend
that stays keeps every fact (an ejection, a drain, its health), a newcomer starts healthy
(it has just registered, and its first probe follows at once) and ramps up under slow start.
A reload that turns the active checks off makes every backend healthy: a verdict no check
will revise any more must not keep a backend out (a fresh start would use it too).

The view a routing table carries:

* ``up[i]``: backend i may take a new request. Normally that is "usable". In **panic mode**
  (the usable share of the enabled backends is above 0 but below ``panic_threshold``
  percent) every enabled backend is up, healthy or not: routing across all of them spreads
  the load, where the few healthy ones would be overwhelmed (Envoy's panic threshold). With
  no usable backend at all there is no panic: clients get a plain 503. Off by default
  (``panic_threshold`` 0). ``healthy`` then holds the usable ones, so that a retry after a
  failed attempt goes to one of them first: a request fails only when none can take it.
* ``sticky_ok[i]``: a request pinned to i by a sticky cookie may still go there (draining
  backends); None when no backend drains.
* ``ramp[i]``: slow start. A backend that became usable after start-up takes a share of
  traffic growing linearly from 10% to 100% over ``slow_start`` seconds (the proxy skips it
  with probability ``1 - ramp``); None when nothing ramps.
"""

from __future__ import annotations

from dataclasses import dataclass

from poise.config.model import UpstreamConfig
from poise.health.passive import Outliers

ENABLED = "enabled"
DRAIN = "drain"
MAINT = "maint"
STATES = (ENABLED, DRAIN, MAINT)
RAMP_FLOOR = 0.1
_NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class View:
    up: tuple[bool, ...]
    sticky_ok: tuple[bool, ...] | None = None
    ramp: tuple[float, ...] | None = None
    panic: bool = False
    # in panic mode, the backends that are usable in their own right (``up`` is then every
    # enabled one): a retry goes to one of these first
    healthy: tuple[bool, ...] | None = None


class GroupStatus:
    __slots__ = ("admin", "cfg", "healthy", "n", "outliers", "reported", "since", "usable")

    def __init__(self, cfg: UpstreamConfig, reported: list[bool] | None = None) -> None:
        self.cfg = cfg
        self.n = n = len(cfg.backends)
        self.healthy = [True] * n
        self.admin = [b.state for b in cfg.backends]
        self.reported = list(reported) if reported is not None else [True] * n
        self.outliers = Outliers(n, cfg.passive)
        self.usable = [self._usable(i) for i in range(n)]
        self.since = [_NEVER] * n  # usable from the start: no slow start

    def _usable(self, i: int) -> bool:
        return (
            self.admin[i] == ENABLED
            and self.healthy[i]
            and self.reported[i]
            and not self.outliers.ejected[i]
        )

    def successor(
        self, cfg: UpstreamConfig, ids: list[str], new_ids: list[str], reported: list[bool]
    ) -> GroupStatus:
        """The status for new membership ``new_ids`` (``ids`` are this status's backends, by
        index): staying backends keep their facts; newcomers are healthy, not yet usable (so
        the next view starts their slow start)."""
        old = {backend_id: i for i, backend_id in enumerate(ids)}
        sources = [old.get(backend_id) for backend_id in new_ids]
        new = GroupStatus(cfg, reported)
        new.outliers = self.outliers.remap(cfg.passive, sources)
        # a verdict of the active checks holds only while they run: with them turned off
        # (a reload), nothing will ever revise it, so every backend counts as healthy again
        checked = cfg.health_check.enabled
        for k, j in enumerate(sources):
            if j is None:
                new.usable[k] = False
                continue
            if checked:
                new.healthy[k] = self.healthy[j]
            if cfg.backends[k].state == self.cfg.backends[j].state:
                new.admin[k] = self.admin[j]  # the operator's current state outlives a change
            # else the source changed it (an instance's weight went to or from 0): it wins
            new.since[k] = self.since[j]
            new.usable[k] = self.usable[j]
        return new

    def set_health(self, up: tuple[bool, ...], now: float) -> None:
        for i, ok in enumerate(up):
            if ok and not self.healthy[i]:
                # The active checks saw it recover: an ejection for what it did while down
                # would only keep a good backend out (Envoy un-ejects on this too).
                self.outliers.reinstate(i, now)
            self.healthy[i] = ok

    def set_admin(self, i: int, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown backend state {state!r} (one of {', '.join(STATES)})")
        self.admin[i] = state

    def view(self, now: float) -> View:
        """The current view; records which backends just became usable (slow start)."""
        n = self.n
        usable = [self._usable(i) for i in range(n)]
        for i in range(n):
            if usable[i] and not self.usable[i]:
                self.since[i] = now
        self.usable = usable
        enabled = [self.admin[i] == ENABLED for i in range(n)]
        n_enabled = sum(enabled)
        n_usable = sum(usable)
        threshold = self.cfg.panic_threshold
        panic = n_usable > 0 and n_usable * 100 < threshold * n_enabled
        up = tuple(enabled) if panic else tuple(usable)
        sticky_ok = None
        if DRAIN in self.admin:
            sticky_ok = tuple(
                self.admin[i] != MAINT
                and (
                    panic or (self.healthy[i] and self.reported[i] and not self.outliers.ejected[i])
                )
                for i in range(n)
            )
        return View(up, sticky_ok, self._ramp(now, usable), panic, tuple(usable) if panic else None)

    def _ramp(self, now: float, usable: list[bool]) -> tuple[float, ...] | None:
        window = self.cfg.slow_start
        if window <= 0:
            return None
        ramp = tuple(
            min(1.0, max(RAMP_FLOOR, (now - self.since[i]) / window)) if usable[i] else 1.0
            for i in range(self.n)
        )
        return ramp if min(ramp) < 1.0 else None

    def describe(self, i: int, now: float) -> dict[str, object]:
        return {
            "state": self.admin[i],
            "healthy": self.healthy[i],
            "reported": self.reported[i],
            "usable": self.usable[i],
            **self.outliers.describe(i, now),
        }

    def __repr__(self) -> str:
        return f"GroupStatus({self.cfg.name}, {sum(self.usable)}/{self.n} usable)"
