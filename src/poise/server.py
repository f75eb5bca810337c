"""Composition root: builds everything from a Config, owns the background tasks, drains.

One ``Server`` is one process's part: its listeners, its routing table, its pools, its health
checkers. ``serve()`` runs until ``stop()``; then it stops accepting, lets in-flight requests
finish for up to ``timeouts.drain``, and closes what is left.

Its ``role`` says which part (``poise.workers`` explains the multi-process layout):

* ``single`` (one process, the default): everything;
* ``control`` (the supervisor of ``--workers N``): health checks, registry, sources, admin
  API and config reload, but no data-plane listeners; every change of shared state it makes
  (health verdicts, membership, operator states, a reload) goes to ``replicate``;
* ``worker``: the data-plane listeners on sockets it inherits, and the state the control
  process sends it; no checks, registry, sources or admin of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from poise import messages
from poise.admin.api import AdminApi
from poise.config.load import parse_backends
from poise.config.model import BackendConfig, Config, HealthCheckConfig, UpstreamConfig
from poise.dataplane import Snapshot, snapshot
from poise.errors import ConfigError, RegistryError
from poise.health.board import HealthBoard
from poise.health.checker import GroupChecker, Probe
from poise.health.probes import probe as probe_backend
from poise.health.state import HealthState, ProbeResult
from poise.health.status import GroupStatus, View
from poise.l4 import L4
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.l7.http import error_response
from poise.l7.redirect import RedirectConnection
from poise.models import Backend, authority_of
from poise.registry.api import RegistryApi
from poise.registry.discovery import backends_of
from poise.registry.model import Instance
from poise.registry.service import RegistryService
from poise.registry.sources import DnsSource, FileSource, SourceError
from poise.routing import RoutingTable, build_table, make_backends, regroup
from poise.tls.contexts import ListenerTls, group_tls, upstream_tls
from poise.tls.gate import PLAIN_HTTP, TlsGate
from poise.tls.tickets import TicketSecrets

BOARD_TICK = 0.25  # seconds between ends of ejections / slow-start steps being applied
BACKLOG = 2048  # a listening socket's accept queue (connections the kernel completed for us)

log = logging.getLogger("poise.server")

Role = Literal["single", "control", "worker"]
# a change of shared state, for the workers (the kinds: poise.messages)
Replicate = Callable[[messages.Replicated], None]


class Server:
    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
        watch_config: bool = False,
        role: Role = "single",
        sockets: dict[str, list[socket.socket]] | None = None,
        ticket_secrets: Mapping[str, Mapping[int, bytes]] | None = None,
    ) -> None:
        self.watch_config = watch_config  # reload when the config file changes
        self.role: Role = role
        # a worker runs no checks, registry, sources or admin API: its control process does
        self.controls = role != "worker"
        # a worker's listening sockets, by listener name (created by its control process)
        self.sockets = sockets or {}
        self.replicate: Replicate | None = None
        # the data plane's numbers: this process's own, or (control) the workers' sum
        self.dataplane: Callable[[], Snapshot] = lambda: snapshot(self)
        # the workers' status and a rolling restart of them, for the admin API (control only)
        self.workers: Callable[[], list[dict[str, Any]]] | None = None
        self.restart_workers: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.config = config
        self.rng = rng or random.Random()
        backends = {name: make_backends(up) for name, up in config.upstreams.items()}
        self.board = HealthBoard(config.upstreams, backends, time.monotonic)
        self.table = build_table(config, self.rng, self.board.statuses)
        self.board.install = self._install
        # the TCP listeners, if any; they read the current table, wherever it was swapped
        self.l4 = L4(config, lambda: self.current_table, self.rng.random)
        self.ctx: Context | None = None
        self.checkers: list[GroupChecker] = []
        self._checker_tasks: dict[str, asyncio.Task[None]] = {}
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._follow_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        # the service registry (opened by serve() when the config has one)
        self.registry: RegistryService | None = None
        self.registry_api: RegistryApi | None = None
        self.registry_address: tuple[str, int] | None = None
        self.admin: AdminApi | None = None
        self.admin_address: tuple[str, int] | None = None
        # backends from a watched file or DNS, by upstream name
        self.sources: dict[str, FileSource | DnsSource] = {}
        self.listeners: list[asyncio.Server] = []
        self.addresses: dict[str, tuple[str, int]] = {}  # listener name -> bound address
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        # TLS contexts are built here, so a certificate that vanished or broke since the
        # config was loaded stops the start, not the first handshake.
        self.tls: dict[str, ListenerTls] = {}
        problems = []
        for i, lc in enumerate(config.listeners):
            if lc.tls is None:
                continue
            header = (lc.tls.client_subject_header or "").encode("ascii")
            # session ticket secrets: a worker's come from its supervisor (poise.workers)
            secrets = None
            if ticket_secrets is not None and lc.name in ticket_secrets:
                secrets = TicketSecrets(lc.tls.session_ticket_rotation, generate=False)
                secrets.install(ticket_secrets[lc.name])
            try:
                self.tls[lc.name] = ListenerTls(
                    lc.name, lc.tls, subject_header=header, secrets=secrets
                )
            except (ValueError, OSError) as exc:
                problems.append(f"listeners[{i}].tls: {exc}")
        try:
            self.upstream_tls = upstream_tls(config.upstreams)
        except (ValueError, OSError) as exc:
            problems.append(f"upstreams: tls: {exc}")
        if problems:
            raise ConfigError(problems, config.source)

    def stop(self) -> None:
        self._stop.set()

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

    def reload_certificates(self) -> dict[str, str]:
        """Load every HTTPS listener's certificate files again, now. Per listener:
        "reloaded", or "failed: <reason>" (the previous certificates then stay in use).
        Connections already open keep the certificate they were handshaken with."""
        return {name: tls.reload(force=True) for name, tls in self.tls.items()}

    # -- runtime changes of static upstreams (the admin API) ----------------------------------

    def _static(self, group: str) -> UpstreamConfig:
        table = self.current_table
        if group not in table.groups:
            raise KeyError(f"no upstream named {group!r}")
        up = table.groups[group].config
        if up.service or up.file or up.dns:
            source = "the registry" if up.service else "its file" if up.file else "DNS"
            raise ValueError(f"upstream {group!r} takes its backends from {source}")
        return up

    def _find(self, up: UpstreamConfig, backend: str) -> int:
        for i, b in enumerate(up.backends):
            if backend in (b.url, authority_of(b.host, b.port)):
                return i
        raise KeyError(f"no backend {backend!r} in upstream {up.name!r}")

    def add_backend(self, group: str, url: str, weight: int = 1) -> BackendConfig:
        """Add a backend to a static upstream (it starts healthy and is probed at once)."""
        up = self._static(group)
        added = parse_backends([{"url": url, "weight": weight}], "backend")[0]
        if any((b.host, b.port) == (added.host, added.port) for b in up.backends):
            raise ValueError(f"upstream {group!r} already has {added.url}")
        self.set_members(group, (*up.backends, added))
        return added

    def remove_backend(self, group: str, backend: str) -> None:
        """Remove a backend: no new requests; in-flight ones finish."""
        up = self._static(group)
        i = self._find(up, backend)
        self.set_members(group, up.backends[:i] + up.backends[i + 1 :])

    def set_backend_weight(self, group: str, backend: str, weight: int) -> None:
        up = self._static(group)
        i = self._find(up, backend)
        changed = dataclasses.replace(up.backends[i], weight=weight)
        self.set_members(group, (*up.backends[:i], changed, *up.backends[i + 1 :]))

    @property
    def current_table(self) -> RoutingTable:
        """The routing table in force: the data plane's (``ctx.table``) once serving,
        ``self.table`` before. The one place that chooses between the two: the admin API,
        metrics, data-plane snapshots, workers' syncs, reloads and L4 all read it here."""
        return self.ctx.table if self.ctx is not None else self.table

    def _install(self, group: str, view: View) -> None:
        """Swap in a routing table with ``group``'s new view: one assignment."""
        table = self.current_table
        new = table.with_group(table.groups[group].with_view(view))
        if self.ctx is not None:
            self.ctx.table = new
        self.table = new

    # -- membership (service registry) -------------------------------------------------------

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
        table = self.current_table
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
        new_table = table.with_group(new)
        if self.ctx is not None:
            self.ctx.table = new_table
            if new.admission is not None:
                new.admission.set_scheduler(self.ctx.loop.call_soon)
        self.table = new_table
        self.board.refresh(group)  # the view (and panic, slow start) for the new membership
        for pool in retired:
            pool.max_idle = 0  # connections still busy are closed when they finish
            pool.close_all()
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

    def _on_instances(self, service: str, instances: tuple[Instance, ...]) -> None:
        backends, reported = backends_of(instances)
        for name, up in self.config.upstreams.items():
            if up.service == service:
                self.set_members(name, backends, reported)

    def _restart_checker(self, group: str, old_ids: list[str], new_ids: list[str]) -> None:
        old = next((c for c in self.checkers if c.group == group), None)
        if old is None or self._tg is None:
            return  # no active checks for this group, or not serving yet
        task = self._checker_tasks.pop(group, None)
        if task is not None:
            task.cancel()
        self.checkers.remove(old)
        by_id = dict(zip(old_ids, old.states, strict=True))
        hc = old.hc
        states = [
            by_id.get(i) or HealthState(rise=hc.rise, fall=hc.fall, history_size=hc.history)
            for i in new_ids
        ]
        self._start_checker(self._tg, group, states)

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

    def _start_checker(
        self, tg: asyncio.TaskGroup, name: str, states: list[HealthState] | None = None
    ) -> GroupChecker:
        group = self.table.groups[name]
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
        self._checker_tasks[name] = tg.create_task(checker.run(), name=f"health:{name}")
        return checker

    async def _open_sources(self) -> None:
        """Read backends files (a bad one stops the start, like a bad config) and look DNS
        names up (a failure leaves the group empty until a lookup succeeds)."""
        problems = []
        for name, up in self.config.upstreams.items():
            source: FileSource | DnsSource
            if up.file is not None:
                source = FileSource(up.file)
                try:
                    self.set_members(name, source.read(), initial=True)
                except SourceError as exc:
                    problems.append(f"upstreams.{name}.file: {exc}")
            elif up.dns is not None:
                source = DnsSource(up.dns)
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
        await self._open_registry()
        await self._open_admin()

    async def _open_admin(self) -> None:
        cfg = self.config.admin
        if cfg is None:
            return
        token = cfg.token
        if token is None:
            token = secrets.token_urlsafe(24)
            log.warning("admin API token (generated; set admin.token to choose one): %s", token)
        self.admin = AdminApi(self, token)
        self.admin_address = host, port = await self.admin.start(*cfg.listen)
        shown = f"[{host}]" if ":" in host else host
        log.info("admin API, metrics and dashboard on http://%s:%d/", shown, port)

    def _source_changed(self, name: str) -> Callable[[tuple[BackendConfig, ...]], None]:
        return lambda backends: self.set_members(name, backends)

    def start_source(self, name: str, source: FileSource | DnsSource) -> None:
        self.sources[name] = source
        if self._tg is not None:
            task = self._tg.create_task(source.follow(self._source_changed(name)))
            self._source_tasks[name] = task

    def stop_source(self, name: str) -> None:
        self.sources.pop(name, None)
        task = self._source_tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def restart_registry_follow(self) -> None:
        """(Re)start following the services the upstreams name."""
        if self._follow_task is not None:
            self._follow_task.cancel()
            self._follow_task = None
        if self.registry is None or self._tg is None:
            return
        services = {u.service for u in self.config.upstreams.values() if u.service}
        self.registry.revision = -1  # list every followed service again at once
        follow = self.registry.follow(services, self._on_instances)
        self._follow_task = self._tg.create_task(follow, name="registry:follow")

    def request_reload(self) -> None:
        """Reload the config file in the background (SIGHUP); the outcome is logged."""
        if self._tg is not None:
            self._tg.create_task(self._reload_logged(), name="reload")

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error(
                "reload refused, the running configuration stays:\n%s",
                "\n".join(f"  - {p}" for p in exc.problems),
            )
        except OSError as exc:
            log.error("reload failed, the running configuration stays: %s", exc)

    async def _watch_config(self) -> None:
        """Reload when the config file's identity changes (checked every second)."""
        path = self.config.source
        if path is None:
            return

        def identity() -> tuple[int, int, int] | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return (st.st_ino, st.st_size, st.st_mtime_ns)

        seen = identity()
        while True:
            await asyncio.sleep(1.0)
            now = identity()
            if now is not None and now != seen:
                seen = now
                await self._reload_logged()

    async def reload(self, config: Config | None = None) -> dict[str, list[str]]:
        """Apply ``config`` (or the config file again) while serving; raises ConfigError,
        with nothing changed, when it cannot be applied. See ``poise.reload``."""
        from poise import reload as reloading

        if config is None:
            changed = await reloading.reload_file(self)
        else:
            changed = await reloading.apply(self, config)
        if self.replicate is not None:
            self.replicate(messages.Reload(self.config))
        return changed

    async def _open_registry(self) -> None:
        """Open the store and load the followed services' instances before serving."""
        cfg = self.config.registry
        if cfg is None:
            return
        self.registry = RegistryService(cfg)
        if cfg.listen is not None:
            self.registry_api = RegistryApi(self.registry.store, cfg)
            self.registry_address = host, port = await self.registry_api.start(*cfg.listen)
            shown = f"[{host}]" if ":" in host else host
            log.info("registry API on http://%s:%d (store: %s)", shown, port, cfg.store)
        services = {up.service for up in self.config.upstreams.values() if up.service}
        try:
            found = await self.registry.snapshot(services)
        except RegistryError as exc:
            # etcd down at start: serve what can be served; the follow loop retries and
            # fills the services in when the store answers
            log.error("registry store unreachable at start (%s): services start empty", exc)
            self.registry.reachable, self.registry.last_error = False, str(exc)
            found = {}
        for name, up in self.config.upstreams.items():
            if up.service:
                backends, reported = backends_of(found.get(up.service, ()))
                self.set_members(name, backends, reported, initial=True)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(BOARD_TICK)
            self.board.tick()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ctx = Context(self.config, self.table, loop, upstream_tls_=self.upstream_tls)
        for warning in self.config.warnings:
            log.warning("configuration: %s", warning)
        for group in self.table.groups.values():
            if group.admission is not None:
                group.admission.set_scheduler(loop.call_soon)
        ctx.on_ejected = self.l4.on_ejected = self.board.ejected
        # Bind first, so a taken port fails plainly before anything else starts; accept only
        # after the registry is read and the first health round.
        if self.role != "control":
            await self._bind(loop, ctx)
        ctx.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.controls:
                await self._open_sources()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks.append(tg.create_task(self._maintain(), name="health:board"))
                tasks.append(tg.create_task(self.l4.run(), name="l4"))
                for name, tls in self.tls.items():
                    tasks.append(tg.create_task(tls.watch(), name=f"tls:{name}"))
                if self.registry is not None:
                    reg = self.registry
                    tasks.append(tg.create_task(reg.expire_forever(), name="registry:expire"))
                    self.restart_registry_follow()
                for name, source in list(self.sources.items()):
                    self.start_source(name, source)
                if self.watch_config and self.controls:
                    tasks.append(tg.create_task(self._watch_config(), name="config:watch"))
                if self.controls:
                    self._start_checkers(tg)
                await self._first_checks()
                await self.l4.ready.wait()
                for server in self.listeners:
                    await server.start_serving()
                if self.role == "single":
                    self._log_listening()
                self.started.set()
                await self._stop.wait()
                await self._drain(ctx)
                background = [*self._checker_tasks.values(), *self._source_tasks.values()]
                if self._follow_task is not None:
                    background.append(self._follow_task)
                for task in [*tasks, *background]:
                    task.cancel()  # the group then ends: cancelled children are not errors
        finally:
            self._tg = None
            await self._close(ctx)

    def _start_checkers(self, tg: asyncio.TaskGroup) -> None:
        for name, group in self.table.groups.items():
            if group.config.health_check.enabled:
                self._start_checker(tg, name)

    async def _first_checks(self) -> None:
        """The first round of checks runs before we accept traffic, so a dead backend is
        known dead before the first request (bounded by the probe timeouts)."""
        if self.checkers:
            waits = [c.first_round.wait() for c in self.checkers]
            limit = max(c.hc.timeout for c in self.checkers) + 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await asyncio.gather(*waits)

    def _log_listening(self) -> None:
        for lc in self.config.listeners:
            host, port = self.addresses[lc.name]
            shown = f"[{host}]" if ":" in host else host
            scheme = "https" if lc.name in self.tls else lc.protocol
            log.info("listening on %s://%s:%d (%s)", scheme, shown, port, lc.name)

    async def _close(self, ctx: Context) -> None:
        """The end of serve, however it ends: listeners, admin, registry, pools."""
        for listener in self.listeners:
            listener.close()  # (already closed after a drain; not when start-up failed)
        ctx.stop()
        if self.admin is not None:
            await self.admin.close()
        if self.registry_api is not None:
            await self.registry_api.close()
        if self.registry is not None:
            await self.registry.close()
        for group in ctx.table.groups.values():
            for pool in group.pools:
                pool.close_all()

    async def _bind(self, loop: asyncio.AbstractEventLoop, ctx: Context) -> None:
        for lc in self.config.listeners:
            name = lc.name
            tls = self.tls.get(name)
            factory: Any
            if lc.tcp is not None:
                factory = self.l4.listeners[name].factory
            elif lc.redirect is not None:
                factory = lambda cfg=lc.redirect: RedirectConnection(ctx, cfg)  # noqa: E731
            elif tls is not None:
                # TLS starts in the gate, after a look at the first bytes (tls/gate.py); a
                # client must finish its handshake as fast as its request head
                # (partials, not lambdas: one Python frame less per connection)
                factory = functools.partial(
                    TlsGate,
                    tls,
                    functools.partial(ClientConnection, ctx, name, tls),
                    ctx.client_header_timeout,
                    functools.partial(_plain_http_reply, ctx),
                )
            else:
                factory = functools.partial(ClientConnection, ctx, name, None)
            try:
                if self.role == "worker":  # sockets from the control process, bound already
                    # (the same backlog: serving listens again, which would shorten the
                    # accept queue a replacement worker shares to asyncio's default 100)
                    servers = [
                        await loop.create_server(
                            factory,
                            sock=sock,
                            backlog=BACKLOG,
                            start_serving=False,
                        )
                        for sock in self.sockets[name]
                    ]
                else:
                    servers = [
                        await loop.create_server(
                            factory,
                            host=lc.host or None,
                            port=lc.port,
                            reuse_address=True,
                            backlog=BACKLOG,
                            start_serving=False,
                        )
                    ]
            except OSError:
                for bound in self.listeners:
                    bound.close()
                raise
            for server in servers:
                self.listeners.append(server)
                for s in server.sockets:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            addr = servers[0].sockets[0].getsockname()
            self.addresses[name] = (str(addr[0]), int(addr[1]))

    async def _drain(self, ctx: Context) -> None:
        log.info("shutting down: no new connections, draining in-flight requests")
        for server in self.listeners:
            server.close()
        # Kept-alive connections get Connection: close on their next response; idle ones a
        # short grace for a request already on the wire (Context.begin_drain).
        ctx.begin_drain()
        self.l4.draining = True  # TCP relays have no idle moment: they get the whole drain time
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeouts.drain
        while (ctx.clients or self.l4.active()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
            ctx.close_idle_clients(ctx.clock())
        if ctx.clients:
            log.warning("drain timeout: closing %d connections", len(ctx.clients))
            for c in list(ctx.clients):
                c.close()
        if self.l4.active():
            log.warning("drain timeout: closing %d TCP connections", self.l4.close_all())
        # Upgraded connections (WebSockets) have no end of their own to wait for.
        for tunnel in list(ctx.tunnels):
            tunnel.close()
        for task in list(ctx.tasks):
            task.cancel()

    def statistics(self) -> dict[str, Any]:
        return {
            "listeners": {k: f"{h}:{p}" for k, (h, p) in self.addresses.items()},
            "proxy": self.ctx.statistics() if self.ctx else {},
            "health": {c.group: c.statistics() for c in self.checkers},
            "backends": self.board.statistics(),
            "registry": self.registry.statistics() if self.registry is not None else None,
            "sources": {name: src.statistics() for name, src in self.sources.items()},
            "tls": self._tls_statistics(),
            "l4": self.l4.statistics(),
        }

    def _tls_statistics(self) -> dict[str, Any]:
        """Each HTTPS listener's, its traffic counters summed over the workers."""
        counted = self.dataplane().get("tls", {})
        out = {}
        for name, tls in self.tls.items():
            stats: dict[str, Any] = tls.statistics()
            c = counted.get(name)
            if c is not None:
                for key in ("handshakes", "plain_http", "version_alerts"):
                    stats[key] = c[key]
                sessions = stats["sessions"]
                stats["sessions"] = {**sessions, "full": c["full"], "resumed": c["resumed"]}
            out[name] = stats
        return out

    def __repr__(self) -> str:
        return f"Server({len(self.config.listeners)} listeners, {len(self.table.groups)} upstreams)"


def _plain_http_reply(ctx: Context) -> bytes:
    """nginx's answer to plain HTTP sent to an HTTPS port (tls/gate.py)."""
    ctx.stats.bad_requests += 1
    return error_response(400, PLAIN_HTTP, ctx.date.value, close=True)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(config: Config, *, watch_config: bool = False) -> int:
    """Run a Server until SIGTERM/SIGINT (SIGHUP reloads); return the process exit code."""
    install_uvloop()

    async def main() -> None:
        server = Server(config, watch_config=watch_config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        loop.add_signal_handler(signal.SIGHUP, server.request_reload)
        await server.serve()

    asyncio.run(main())
    return 0
