"""Membership: the one owner of the upstreams' backends and of what follows their changes.

Theory of operation
-------------------
``Membership`` holds the routing table in force (``table``) and the health board, and is
the only writer of both: every change of an upstream's backends goes through it, whoever
asks. The askers:

* the service registry's follow loop (``on_instances``), a watched backends file or DNS
  name (``start_source``), the admin API (``add_backend``, ``remove_backend``,
  ``set_backend_weight``, ``set_backend_state``);
* the active health checkers (``publish_health``, ``probe_passed``) and the board's own
  ticks (ends of ejections, slow-start steps: ``_install``);
* a reload (``poise.reload`` plans the new groups, ``replace`` switches to them,
  ``restart_background`` restarts what follows the changed upstreams);
* a worker of ``--workers N`` applying what its control process sent (``set_members``,
  ``apply_shared``), the control process describing it (``shared_state``).

A change is made in one order everywhere: the group is rebuilt (``routing.regroup``:
backends that stay keep their health, ejection, operator state and pooled connections), the
board takes its new status, the new table is published with one assignment (the data
plane's ``Context.table`` is the same object once ``attach`` has run), the pools of
backends that left are retired (busy connections finish their exchange, then close), and
the group's health checker restarts carrying each staying backend's probe history. In a
control process every change also goes to ``replicate`` for the workers (the messages:
``poise.messages``).

The background tasks (health checkers, file and DNS sources, the registry follow loop) run
in the server's task group once ``start`` has been given it; before that, changes only
update the table (the initial membership read before serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from poise import messages
from poise.config.load import parse_backends
from poise.config.model import BackendConfig, Config, HealthCheckConfig, UpstreamConfig
from poise.errors import ConfigError
from poise.health.board import HealthBoard
from poise.health.checker import GroupChecker, Probe
from poise.health.probes import probe as probe_backend
from poise.health.state import HealthState, ProbeResult
from poise.health.status import GroupStatus, View
from poise.messages import GroupState
from poise.models import Backend, authority_of
from poise.registry.discovery import backends_of
from poise.registry.model import Instance
from poise.registry.sources import DnsSource, FileSource, SourceError
from poise.routing import Group, RoutingTable, build_table, make_backends, regroup
from poise.tls.contexts import ClientTls, group_tls

if TYPE_CHECKING:
    from poise.l7.context import Context
    from poise.registry.service import RegistryService

BOARD_TICK = 0.25  # seconds between ends of ejections / slow-start steps being applied

log = logging.getLogger("poise.membership")

# a change of shared state, for the workers (the kinds: poise.messages)
Replicate = Callable[[messages.Replicated], None]


class Membership:
    def __init__(
        self,
        config: Config,
        rng: random.Random,
        upstream_tls: dict[str, ClientTls],
        *,
        controls: bool = True,
    ) -> None:
        self.config = config  # the configuration in force (replaced by a reload)
        self.rng = rng
        # a worker runs no checks, registry or sources: its control process does
        self.controls = controls
        self.upstream_tls = upstream_tls  # by upstream, for its https:// backends
        self.replicate: Replicate | None = None
        backends = {name: make_backends(ucfg) for name, ucfg in config.upstreams.items()}
        self.board = HealthBoard(config.upstreams, backends, time.monotonic)
        self._table = build_table(config, rng, self.board.statuses)
        self.board.install = self._install
        self.ctx: Context | None = None
        self.checkers: list[GroupChecker] = []
        self._checker_tasks: dict[str, asyncio.Task[None]] = {}
        # backends from a watched file or DNS, by upstream name
        self.sources: dict[str, FileSource | DnsSource] = {}
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self.registry: RegistryService | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._board_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None

    # -- the table ---------------------------------------------------------------------------

    @property
    def table(self) -> RoutingTable:
        """The routing table in force (the data plane's ``Context.table`` once attached)."""
        return self._table

    def publish(self, table: RoutingTable, changed: Mapping[str, Group] | None = None) -> None:
        """Make ``table`` the one in force: one assignment for the data plane. ``changed``:
        the groups that are new, whose admission queues take the loop's scheduler."""
        self._table = table
        ctx = self.ctx
        if ctx is not None:
            ctx.table = table
            for group in (changed or {}).values():
                if group.admission is not None:
                    group.admission.set_scheduler(ctx.loop.call_soon)

    def attach(self, ctx: Context) -> None:
        """The data plane starts: it reads the table from ``ctx`` from now on."""
        self.ctx = ctx
        ctx.on_ejected = self.board.ejected
        self.publish(self._table, self._table.groups)

    def _install(self, group: str, view: View) -> None:
        """Swap in a routing table with ``group``'s new view (the board's ``install``)."""
        table = self._table
        self.publish(table.with_group(table.groups[group].with_view(view)))

    # -- backends of a group -----------------------------------------------------------------

    def set_members(
        self,
        group: str,
        backends: tuple[BackendConfig, ...],
        reported: list[bool] | None = None,
        *,
        initial: bool = False,
    ) -> None:
        """Replace ``group``'s backends (discovered instances come and go). Backends that stay
        keep their health, ejections, operator state and pooled connections; newcomers start
        healthy, ramp up under slow start (not when ``initial``), and get probed at once.
        In-flight requests finish on the backends they are on, also on ones that left."""
        table = self._table
        old = table.groups[group]
        cfg = dataclasses.replace(old.config, backends=backends)
        ok = reported if reported is not None else [True] * len(backends)
        old_ids = [b.id for b in old.backends]
        new_ids = [authority_of(b.host, b.port) for b in backends]
        if initial:
            status = GroupStatus(cfg, ok)
        else:
            status = self.board.statuses[group].successor(cfg, old_ids, new_ids, ok)
        new, retired = regroup(old, cfg, self.rng, status)
        self.board.replace(group, status, new.backends)
        self.publish(table.with_group(new), {group: new})
        self.board.refresh(group)  # the view (and panic, slow start) for the new membership
        _retire(retired)
        added = sorted(set(new_ids) - set(old_ids))
        removed = sorted(set(old_ids) - set(new_ids))
        if added or removed:
            log.info(
                "upstream %s: %d backends (+%s -%s)",
                group,
                len(new_ids),
                ",".join(added) or "0",
                ",".join(removed) or "0",
            )
        self._restart_checker(group, old_ids, new_ids)
        if self.replicate is not None:
            self.replicate(messages.Members(group, backends, reported, initial))

    def on_instances(self, service: str, instances: tuple[Instance, ...]) -> None:
        """The registry's instances of ``service`` now (the follow loop's callback)."""
        backends, reported = backends_of(instances)
        for name, ucfg in self.config.upstreams.items():
            if ucfg.service == service:
                self.set_members(name, backends, reported)

    def seed_registry(self, found: Mapping[str, tuple[Instance, ...]]) -> None:
        """The registry's instances read before serving, by service."""
        for name, ucfg in self.config.upstreams.items():
            if ucfg.service:
                backends, reported = backends_of(found.get(ucfg.service, ()))
                self.set_members(name, backends, reported, initial=True)

    # -- health verdicts and operator states --------------------------------------------------

    def publish_health(self, group: str, up: tuple[bool, ...]) -> None:
        """The active checks' verdicts for ``group`` (called by its GroupChecker)."""
        self.board.active(group, up)
        if self.replicate is not None:
            self.replicate(messages.Health(group, up))

    def probe_passed(self, group: str, index: int, started: float) -> None:
        """A probe passed (the checker's ``passed``): it may end a passive ejection."""
        self.board.probe_passed(group, index, started)
        if self.replicate is not None:
            self.replicate(messages.Passed(group, index, started))

    def set_backend_state(self, group: str, backend: str, state: str) -> None:
        """Operator state of a backend ("http://host:port" or "host:port"): "enabled",
        "drain" (no new requests but sticky ones; in-flight ones finish) or "maint"."""
        self.board.set_state(group, backend, state)
        if self.replicate is not None:
            self.replicate(messages.State(group, backend, state))

    # -- runtime changes of static upstreams (the admin API) ----------------------------------

    def _static(self, group: str) -> UpstreamConfig:
        table = self._table
        if group not in table.groups:
            raise KeyError(f"no upstream named {group!r}")
        up = table.groups[group].config
        if up.service or up.file or up.dns:
            source = "the registry" if up.service else "its file" if up.file else "DNS"
            raise ValueError(f"upstream {group!r} takes its backends from {source}")
        return up

    @staticmethod
    def _find(ucfg: UpstreamConfig, backend: str) -> int:
        for i, b in enumerate(ucfg.backends):
            if backend in (b.url, authority_of(b.host, b.port)):
                return i
        raise KeyError(f"no backend {backend!r} in upstream {ucfg.name!r}")

    def add_backend(self, group: str, url: str, weight: int = 1) -> BackendConfig:
        """Add a backend to a static upstream (it starts healthy and is probed at once)."""
        ucfg = self._static(group)
        added = parse_backends([{"url": url, "weight": weight}], "backend")[0]
        if any((b.host, b.port) == (added.host, added.port) for b in ucfg.backends):
            raise ValueError(f"upstream {group!r} already has {added.url}")
        self.set_members(group, (*ucfg.backends, added))
        return added

    def remove_backend(self, group: str, backend: str) -> None:
        """Remove a backend: no new requests; in-flight ones finish."""
        ucfg = self._static(group)
        i = self._find(ucfg, backend)
        self.set_members(group, ucfg.backends[:i] + ucfg.backends[i + 1 :])

    def set_backend_weight(self, group: str, backend: str, weight: int) -> None:
        ucfg = self._static(group)
        i = self._find(ucfg, backend)
        changed = dataclasses.replace(ucfg.backends[i], weight=weight)
        self.set_members(group, (*ucfg.backends[:i], changed, *ucfg.backends[i + 1 :]))

    # -- health checkers -----------------------------------------------------------------------

    def _restart_checker(self, group: str, old_ids: list[str], new_ids: list[str]) -> None:
        old = next((c for c in self.checkers if c.group == group), None)
        if old is None or self._tg is None:
            return  # no active checks for this group, or not serving yet
        self._stop_checker(old)
        by_id = dict(zip(old_ids, old.states, strict=True))
        self._start_checker(group, [by_id.get(i) or _fresh(old.hc) for i in new_ids])

    def _stop_checker(self, checker: GroupChecker) -> None:
        task = self._checker_tasks.pop(checker.group, None)
        if task is not None:
            task.cancel()
        self.checkers.remove(checker)

    def _probe_for(self, group: str) -> Probe:
        """The group's active-check probe: over TLS to its https:// backends."""

        async def probe(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
            tls = None
            if backend.scheme == "https":
                tls = self.upstream_tls.get(group)
                if tls is None:
                    tls = self.upstream_tls[group] = group_tls(self.config.upstreams[group])
            return await probe_backend(backend, hc, tls)

        return probe

    def _start_checker(self, name: str, states: list[HealthState] | None = None) -> None:
        assert self._tg is not None
        group = self._table.groups[name]
        checker = GroupChecker(
            name,
            group.backends,
            group.config.health_check,
            self.publish_health,
            self.rng,
            passed=self.probe_passed,
            states=states,
            probe=self._probe_for(name),
        )
        self.checkers.append(checker)
        self._checker_tasks[name] = self._tg.create_task(checker.run(), name=f"health:{name}")

    async def first_checks(self) -> None:
        """The first round of checks runs before we accept traffic, so a dead backend is
        known dead before the first request (bounded by the probe timeouts)."""
        if self.checkers:
            waits = [c.first_round.wait() for c in self.checkers]
            limit = max(c.hc.timeout for c in self.checkers) + 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await asyncio.gather(*waits)

    # -- file and DNS sources, the registry follow loop ----------------------------------------

    async def open_sources(self) -> None:
        """Read backends files (a bad one stops the start, like a bad config) and look DNS
        names up (a failure leaves the group empty until a lookup succeeds)."""
        problems = []
        for name, ucfg in self.config.upstreams.items():
            source: FileSource | DnsSource
            if ucfg.file is not None:
                source = FileSource(ucfg.file)
                try:
                    self.set_members(name, source.read(), initial=True)
                except SourceError as exc:
                    problems.append(f"upstreams.{name}.file: {exc}")
            elif ucfg.dns is not None:
                source = DnsSource(ucfg.dns)
                try:
                    self.set_members(name, await source.resolve(), initial=True)
                except SourceError as exc:
                    source.error = str(exc)
                    log.error("upstream %s: %s (no backends until a lookup succeeds)", name, exc)
            else:
                continue
            self.sources[name] = source
        if problems:
            raise ConfigError(problems, self.config.source)

    def start_source(self, name: str, source: FileSource | DnsSource) -> None:
        self.sources[name] = source
        if self._tg is not None:
            follow = source.follow(lambda backends: self.set_members(name, backends))
            self._source_tasks[name] = self._tg.create_task(follow, name=f"source:{name}")

    def stop_source(self, name: str) -> None:
        self.sources.pop(name, None)
        task = self._source_tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def follow_registry(self) -> None:
        """(Re)start following the services the upstreams name."""
        if self._follow_task is not None:
            self._follow_task.cancel()
            self._follow_task = None
        if self.registry is None or self._tg is None:
            return
        services = {u.service for u in self.config.upstreams.values() if u.service}
        self.registry.revision = -1  # list every followed service again at once
        follow = self.registry.follow(services, self.on_instances)
        self._follow_task = self._tg.create_task(follow, name="registry:follow")

    # -- running -------------------------------------------------------------------------------

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start the background work in ``tg``: the board's ticks; in a control process the
        checkers, the sources and the registry follow loop."""
        self._tg = tg
        self._board_task = tg.create_task(self._maintain(), name="health:board")
        if not self.controls:
            return
        self.follow_registry()
        for name, source in list(self.sources.items()):
            self.start_source(name, source)
        for name, group in self._table.groups.items():
            if group.config.health_check.enabled:
                self._start_checker(name)

    def stop(self) -> None:
        """Cancel the background work (the task group then ends)."""
        tg, self._tg = self._tg, None
        if tg is None:
            return
        tasks = [*self._checker_tasks.values(), *self._source_tasks.values()]
        for task in [*tasks, self._follow_task, self._board_task]:
            if task is not None:
                task.cancel()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(BOARD_TICK)
            self.board.tick()

    # -- a reload ------------------------------------------------------------------------------

    def replace(
        self,
        config: Config,
        table: RoutingTable,
        statuses: Mapping[str, GroupStatus],
        removed: list[str],
        retired: list[Any],
    ) -> None:
        """A reload's switch: ``table`` (built around the groups ``poise.reload`` planned)
        in force, the board with the new and changed groups' ``statuses``, the pools of
        removed backends and groups retired."""
        for name in removed:
            self.board.remove(name)
        for name, status in statuses.items():
            self.board.replace(name, status, table.groups[name].backends)
        self.config = config
        self.publish(table, {name: table.groups[name] for name in statuses})
        for name in statuses:
            self.board.refresh(name)
        _retire(retired)

    def restart_background(
        self,
        old: Config,
        old_groups: Mapping[str, Group],
        sources: Mapping[str, FileSource | DnsSource],
    ) -> None:
        """After a reload from ``old``: health checkers restart for groups whose backends or
        check settings changed (carrying each staying backend's probe history), ``sources``
        (new or changed file/DNS upstreams) replace the old ones, and the registry follow
        loop restarts if the services upstreams name changed."""
        new = self.config
        for checker in list(self.checkers):
            name = checker.group
            group = self._table.groups.get(name)
            before = old_groups.get(name)
            if (
                group is not None
                and before is not None
                and group.backends == before.backends
                and group.config.health_check == before.config.health_check
            ):
                continue
            self._stop_checker(checker)
            if group is None or not group.config.health_check.enabled or self._tg is None:
                continue
            states = None
            if group.config.health_check == checker.hc:
                by_id = {b.id: s for b, s in zip(checker.backends, checker.states, strict=True)}
                states = [by_id.get(b.id) or _fresh(checker.hc) for b in group.backends]
            self._start_checker(name, states)
        if self._tg is not None and self.controls:
            running = {c.group for c in self.checkers}
            for name, group in self._table.groups.items():
                if name not in running and group.config.health_check.enabled:
                    self._start_checker(name)
        for name in list(self.sources):
            ucfg = new.upstreams.get(name)
            if ucfg is None or name in sources or not (ucfg.file or ucfg.dns):
                self.stop_source(name)
        for name, source in sources.items():
            self.stop_source(name)
            self.start_source(name, source)
        before_services = {u.service for u in old.upstreams.values() if u.service}
        if before_services != {u.service for u in new.upstreams.values() if u.service}:
            self.follow_registry()

    # -- the shared state of --workers N --------------------------------------------------------

    def shared_state(self) -> dict[str, GroupState]:
        """The shared state, by upstream: what a ``Sync`` carries to a worker."""
        statuses = self.board.statuses
        return {
            name: GroupState(
                group.config.backends,
                tuple(statuses[name].reported),
                tuple(statuses[name].healthy),
                tuple(statuses[name].admin),
            )
            for name, group in self._table.groups.items()
        }

    def apply_shared(self, state: Mapping[str, GroupState]) -> None:
        """Make this (a worker's) shared state the control process's."""
        now = self.board.clock()
        for name, shared in state.items():
            group = self._table.groups.get(name)
            if group is None:
                continue
            if group.config.backends != shared.backends:
                initial = self.ctx is None
                self.set_members(name, shared.backends, list(shared.reported), initial=initial)
            status = self.board.statuses[name]
            status.reported = list(shared.reported)
            status.admin = list(shared.admin)
            status.set_health(shared.healthy, now)
            self.board.refresh(name)

    def statistics(self) -> dict[str, Any]:
        return {
            "health": {c.group: c.statistics() for c in self.checkers},
            "backends": self.board.statistics(),
            "sources": {name: src.statistics() for name, src in self.sources.items()},
        }


def _fresh(hc: HealthCheckConfig) -> HealthState:
    return HealthState(rise=hc.rise, fall=hc.fall, history_size=hc.history)


def _retire(pools: list[Any]) -> None:
    for pool in pools:
        pool.max_idle = 0  # connections still busy are closed when they finish
        pool.close_all()
