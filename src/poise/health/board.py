"""The health board: every group's ``GroupStatus``, fed by the active checkers, the proxy
(passive ejections) and the operator (admin states), and turned into routing-table views.

The board decides nothing itself (``status`` and ``passive`` do); it applies reports, logs
every change with its reason, and installs the new view through ``install`` (the server swaps
the routing table). ``tick`` ends ejections that are due and moves slow-start ramps on; the
server runs it on a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from poise.config.model import UpstreamConfig
from poise.health.passive import Outliers
from poise.health.status import GroupStatus, View
from poise.models import Backend

log = logging.getLogger("poise.health")

Install = Callable[[str, View], None]


class HealthBoard:
    def __init__(
        self,
        upstreams: Mapping[str, UpstreamConfig],
        backends: Mapping[str, tuple[Backend, ...]],
        clock: Callable[[], float],
    ) -> None:
        self.statuses = {name: GroupStatus(ucfg) for name, ucfg in upstreams.items()}
        self.backends = dict(backends)
        self.clock = clock
        self.install: Install = lambda group, view: None
        self._panic = dict.fromkeys(self.statuses, False)
        self._ramping: set[str] = set()

    # -- reports ---------------------------------------------------------------------------

    def active(self, group: str, up: tuple[bool, ...]) -> None:
        """The active checks' verdicts for ``group`` (by backend index)."""
        status = self.statuses[group]
        now = self.clock()
        for i, ok in enumerate(up):
            if ok and not status.healthy[i] and status.outliers.ejected[i]:
                log.info("backend %s in %s back in service: active check passed",
                         self.backends[group][i].url, group)  # fmt: skip
        status.set_health(up, now)
        self.refresh(group)

    def probe_passed(self, group: str, index: int, started: float) -> None:
        """An active probe of a backend passed (``started`` on the board's clock): it ends a
        connection-level ejection that began before the probe (``Outliers.probe_passed``)."""
        status = self.statuses[group]
        if status.outliers.probe_passed(index, started, self.clock()):
            log.info("backend %s in %s back in service: active check passed after ejection",
                     self.backends[group][index].url, group)  # fmt: skip
            self.refresh(group)

    def ejected(self, group: str, index: int, outliers: Outliers | None = None) -> None:
        """The proxy ejected a backend (passive health): log it and route around it. A report
        from before a membership change (other ``outliers``) no longer applies: ignored."""
        status = self.statuses[group]
        if outliers is not None and outliers is not status.outliers:
            return
        log.warning(
            "backend %s in %s %s",
            self.backends[group][index].url,
            group,
            status.outliers.reasons[index],
            extra={"group": group, "backend": self.backends[group][index].url},
        )
        self.refresh(group)

    def set_state(self, group: str, backend: str, state: str) -> None:
        """Operator state of a backend (its URL, or host:port): enabled, drain or maint."""
        if group not in self.statuses:
            raise KeyError(f"no upstream named {group!r}")
        for b in self.backends[group]:
            if backend in (b.url, b.id, b.authority):
                self.statuses[group].set_admin(b.index, state)
                log.info("backend %s in %s set to %s", b.url, group, state.upper())
                self.refresh(group)
                return
        raise KeyError(f"no backend {backend!r} in upstream {group!r}")

    def replace(self, group: str, status: GroupStatus, backends: tuple[Backend, ...]) -> None:
        """New membership for ``group`` (the server built ``status`` as a successor), or a
        new group (a reload)."""
        self.statuses[group] = status
        self.backends[group] = backends
        self._panic.setdefault(group, False)

    def remove(self, group: str) -> None:
        """A group that a reload removed."""
        self.statuses.pop(group, None)
        self.backends.pop(group, None)
        self._panic.pop(group, None)
        self._ramping.discard(group)

    # -- views -----------------------------------------------------------------------------

    def view(self, group: str) -> View:
        return self.statuses[group].view(self.clock())

    def refresh(self, group: str) -> None:
        view = self.view(group)
        if view.panic != self._panic[group]:
            self._panic[group] = view.panic
            if view.panic:
                log.error("upstream %s in PANIC mode: too few healthy backends, routing to "
                          "all of them", group)  # fmt: skip
            else:
                log.warning("upstream %s left panic mode", group)
        if not view.up:
            log.warning("upstream %s has no backends (requests get 503)", group)
        elif not any(view.up) and not any(self.statuses[group].usable):
            log.error("upstream %s has no healthy backend", group)
        if view.ramp is not None:
            self._ramping.add(group)
        else:
            self._ramping.discard(group)
        self.install(group, view)

    def tick(self) -> None:
        now = self.clock()
        for group, status in self.statuses.items():
            back = status.outliers.expire(now)
            for i in back:
                log.info("backend %s in %s back in service: ejection ended",
                         self.backends[group][i].url, group)  # fmt: skip
            if back or group in self._ramping:
                self.refresh(group)

    def statistics(self) -> dict[str, object]:
        now = self.clock()
        return {
            group: {
                "panic": self._panic[group],
                "ejections": status.outliers.ejections,
                "backends": {b.url: status.describe(b.index, now) for b in self.backends[group]},
            }
            for group, status in self.statuses.items()
        }

    def __repr__(self) -> str:
        return f"HealthBoard({len(self.statuses)} groups)"
