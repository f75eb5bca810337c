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
import functools
import logging
import os
import random
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from poise import looptune, messages, wire
from poise.admin.api import AdminApi
from poise.config.model import Config
from poise.dataplane import Snapshot, snapshot
from poise.errors import ConfigError, RegistryError
from poise.h2.listen import factory as http2_factory
from poise.l4 import L4
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.l7.http import error_response
from poise.l7.redirect import RedirectConnection
from poise.membership import Membership
from poise.registry.api import RegistryApi
from poise.registry.service import RegistryService
from poise.routing import RoutingTable
from poise.tls.contexts import ListenerTls, upstream_tls
from poise.tls.gate import PLAIN_HTTP, TlsGate
from poise.tls.tickets import TicketSecrets

BACKLOG = 2048  # a listening socket's accept queue (connections the kernel completed for us)

log = logging.getLogger("poise.server")

Role = Literal["single", "control", "worker"]


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
        # the data plane's numbers: this process's own, or (control) the workers' sum
        self.dataplane: Callable[[], Snapshot] = self.own_numbers
        # the workers' status and a rolling restart of them, for the admin API (control only)
        self.workers: Callable[[], list[dict[str, Any]]] | None = None
        self.restart_workers: Callable[[], Awaitable[dict[str, Any]]] | None = None
        rng = rng or random.Random()
        # the upstreams' backends, the routing table and what follows their changes
        # (health checkers, sources, the registry follow loop): one owner
        self.membership = Membership(config, rng, {}, controls=self.controls)
        # the TCP listeners, if any; they read the current table, wherever it was swapped
        self.l4 = L4(config, lambda: self.membership.table, rng.random)
        self.ctx: Context | None = None
        self._tg: asyncio.TaskGroup | None = None
        # the service registry (opened by serve() when the config has one)
        self.registry: RegistryService | None = None
        self.registry_api: RegistryApi | None = None
        self.registry_address: tuple[str, int] | None = None
        self.admin: AdminApi | None = None
        self.admin_address: tuple[str, int] | None = None
        self.listeners: list[asyncio.Server | wire.HubServer] = []
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
            self.membership.upstream_tls.update(upstream_tls(config.upstreams))
        except (ValueError, OSError) as exc:
            problems.append(f"upstreams: tls: {exc}")
        if problems:
            raise ConfigError(problems, config.source)

    def stop(self) -> None:
        self._stop.set()

    def reload_certificates(self) -> dict[str, str]:
        """Load every HTTPS listener's certificate files again, now. Per listener:
        "reloaded", or "failed: <reason>" (the previous certificates then stay in use).
        Connections already open keep the certificate they were handshaken with."""
        return {name: tls.reload(force=True) for name, tls in self.tls.items()}

    @property
    def config(self) -> Config:
        """The configuration in force (a reload replaces it)."""
        return self.membership.config

    @property
    def table(self) -> RoutingTable:
        """The routing table in force (``Membership.table``)."""
        return self.membership.table

    async def _open_sources(self) -> None:
        """The backends files, DNS names and the registry, read before serving, then the
        admin API."""
        await self.membership.open_sources()
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
            from poise.config import load_config

            path = self.config.source
            if path is None or path in ("command line", "poise demo"):
                raise ConfigError(
                    ["this configuration did not come from a file: nothing to reload"]
                )
            config = await asyncio.to_thread(load_config, path)
        changed = await reloading.apply(
            self.membership, config, addresses=self.addresses, tls=self.tls
        )
        if self.membership.replicate is not None:
            self.membership.replicate(messages.Reload(self.config))
        return changed

    async def _open_registry(self) -> None:
        """Open the store and load the followed services' instances before serving."""
        cfg = self.config.registry
        if cfg is None:
            return
        self.registry = self.membership.registry = RegistryService(cfg)
        if cfg.listen is not None:
            self.registry_api = RegistryApi(self.registry.store, cfg)
            self.registry_address = host, port = await self.registry_api.start(*cfg.listen)
            self.registry.api_bound(host, port)
            shown = f"[{host}]" if ":" in host else host
            log.info("registry API on http://%s:%d (store: %s)", shown, port, cfg.store)
        services = {ucfg.service for ucfg in self.config.upstreams.values() if ucfg.service}
        try:
            found = await self.registry.snapshot(services)
        except RegistryError as exc:
            # etcd down at start: serve what can be served; the follow loop retries and
            # fills the services in when the store answers
            log.error("registry store unreachable at start (%s): services start empty", exc)
            self.registry.reachable, self.registry.last_error = False, str(exc)
            found = {}
        self.membership.seed_registry(found)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        looptune.lighten(loop)  # uvloop's per-connection record, cheaper (looptune.py)
        membership = self.membership
        ctx = self.ctx = Context(
            self.config, membership.table, loop, upstream_tls_=membership.upstream_tls
        )
        for warning in self.config.warnings:
            log.warning("configuration: %s", warning)
        membership.attach(ctx)
        self.l4.on_ejected = membership.board.ejected
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
                tasks.append(tg.create_task(self.l4.run(), name="l4"))
                for name, tls in self.tls.items():
                    tasks.append(tg.create_task(tls.watch(), name=f"tls:{name}"))
                if self.registry is not None:
                    reg = self.registry
                    tasks.append(tg.create_task(reg.expire_forever(), name="registry:expire"))
                if self.watch_config and self.controls:
                    tasks.append(tg.create_task(self._watch_config(), name="config:watch"))
                membership.start(tg)
                await membership.first_checks()
                await self.l4.ready.wait()
                for server in self.listeners:
                    await server.start_serving()
                if self.role == "single":
                    self._log_listening()
                self.started.set()
                await self._stop.wait()
                await self._drain(ctx)
                membership.stop()
                for task in tasks:
                    task.cancel()  # the group then ends: cancelled children are not errors
        finally:
            self._tg = None
            membership.stop()
            await self._close(ctx)

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
        wire.shutdown(asyncio.get_running_loop())  # (connections left: closed by now)
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
                # (partials, not lambdas: one Python frame less per connection); with
                # HTTP/2 on, ALPN chooses the protocol once it is done (h2/__init__.py)
                app = http2_factory(ctx, name, tls, lc.http2) if lc.http2 is not None else None
                factory = functools.partial(
                    TlsGate,
                    ctx,
                    tls,
                    app or functools.partial(ClientConnection, ctx, name, tls),
                    ctx.client_header_timeout,
                    functools.partial(_plain_http_reply, ctx),
                )
            elif lc.http2 is not None:
                # h2c with prior knowledge beside HTTP/1.1: the first bytes decide
                factory = http2_factory(ctx, name, None, lc.http2) or functools.partial(
                    ClientConnection, ctx, name, None
                )
            else:
                factory = functools.partial(ClientConnection, ctx, name, None)
            # HTTP listeners' client sockets are served by poise's own C hub where it is
            # built (wire/__init__.py), under the TLS transport too; TCP listeners' by the
            # loop (the L4 pump takes their sockets once connected).
            own = lc.tcp is None
            try:
                if self.role == "worker":  # sockets from the control process, bound already
                    # (the same backlog: serving listens again, which would shorten the
                    # accept queue a replacement worker shares to asyncio's default 100)
                    servers = [
                        await wire.create_server(loop, factory, sock=sock, backlog=BACKLOG, own=own)
                        for sock in self.sockets[name]
                    ]
                else:
                    servers = [
                        await wire.create_server(
                            loop,
                            factory,
                            host=lc.host or None,
                            port=lc.port,
                            reuse_address=True,
                            backlog=BACKLOG,
                            own=own,
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
        while (ctx.clients or ctx.sessions or self.l4.active()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
            ctx.close_idle_clients(ctx.clock())
        if ctx.clients or ctx.sessions:
            log.warning(
                "drain timeout: closing %d connections", len(ctx.clients) + len(ctx.sessions)
            )
            for c in list(ctx.clients):
                c.close()
            for session in list(ctx.sessions):
                session.close()
        if self.l4.active():
            log.warning("drain timeout: closing %d TCP connections", self.l4.close_all())
        # Upgraded connections (WebSockets) have no end of their own to wait for.
        for tunnel in list(ctx.tunnels):
            tunnel.close()
        for task in list(ctx.tasks):
            task.cancel()

    def own_numbers(self) -> Snapshot:
        """This process's data-plane numbers (``poise.dataplane``)."""
        return snapshot(self.membership, self.l4, self.tls)

    def statistics(self) -> dict[str, Any]:
        return {
            "listeners": {k: f"{h}:{p}" for k, (h, p) in self.addresses.items()},
            "proxy": self.ctx.statistics() if self.ctx else {},
            **self.membership.statistics(),
            "registry": self.registry.statistics() if self.registry is not None else None,
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
