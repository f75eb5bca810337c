"""Composition root: builds everything from a Config, owns the background tasks, drains.

One ``Server`` is one worker: its listeners, its routing table, its pools, its health
checkers. ``serve()`` runs until ``stop()``; then it stops accepting, lets in-flight requests
finish for up to ``timeouts.drain``, and closes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
import time
from typing import Any

from poise.config.model import Config, HealthCheckConfig
from poise.errors import ConfigError
from poise.health.board import HealthBoard
from poise.health.checker import GroupChecker, Probe
from poise.health.probes import probe as probe_backend
from poise.health.state import ProbeResult
from poise.health.status import View
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.l7.redirect import RedirectConnection
from poise.models import Backend
from poise.routing import build_table, make_backends
from poise.tls.contexts import ClientTls, ListenerTls, upstream_tls

BOARD_TICK = 0.25  # seconds between ends of ejections / slow-start steps being applied

log = logging.getLogger("poise.server")


class Server:
    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        backends = {name: make_backends(up) for name, up in config.upstreams.items()}
        self.board = HealthBoard(config.upstreams, backends, time.monotonic)
        self.table = build_table(config, self.rng, self.board.statuses)
        self.ctx: Context | None = None
        self.checkers: list[GroupChecker] = []
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
            try:
                self.tls[lc.name] = ListenerTls(lc.name, lc.tls, subject_header=header)
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

    def set_backend_state(self, group: str, backend: str, state: str) -> None:
        """Operator state of a backend ("http://host:port" or "host:port"): "enabled",
        "drain" (no new requests but sticky ones; in-flight ones finish) or "maint"."""
        self.board.set_state(group, backend, state)

    def reload_certificates(self) -> dict[str, str]:
        """Load every HTTPS listener's certificate files again, now. Per listener:
        "reloaded", or "failed: <reason>" (the previous certificates then stay in use).
        Connections already open keep the certificate they were handshaken with."""
        return {name: tls.reload(force=True) for name, tls in self.tls.items()}

    def _install(self, group: str, view: View) -> None:
        """Swap in a routing table with ``group``'s new view: one assignment."""
        table = self.ctx.table if self.ctx is not None else self.table
        new = table.with_group(table.groups[group].with_view(view))
        if self.ctx is not None:
            self.ctx.table = new
        self.table = new

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
        self.board.install = self._install
        ctx.on_ejected = self.board.ejected
        # Bind first, so a taken port fails plainly before anything else starts; accept only
        # after the first health round.
        await self._bind(loop, ctx)
        ctx.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tg:
                tasks.append(tg.create_task(self._maintain(), name="health:board"))
                for name, tls in self.tls.items():
                    if tls.cfg.reload_interval > 0:
                        tasks.append(tg.create_task(tls.watch(), name=f"tls:{name}"))
                for name, group in self.table.groups.items():
                    hc = group.config.health_check
                    if not hc.enabled:
                        continue
                    checker = GroupChecker(
                        name,
                        group.backends,
                        hc,
                        self.publish_health,
                        self.rng,
                        passed=self.board.probe_passed,
                        probe=_probe_with(self.upstream_tls.get(name)),
                    )
                    self.checkers.append(checker)
                    tasks.append(tg.create_task(checker.run(), name=f"health:{name}"))
                # The first round of checks runs before we accept traffic, so a dead backend
                # is known dead before the first request (bounded by the probe timeouts).
                if self.checkers:
                    waits = [c.first_round.wait() for c in self.checkers]
                    limit = max(c.hc.timeout for c in self.checkers) + 1.0
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(limit):
                            await asyncio.gather(*waits)
                for server, (name, (host, port)) in zip(
                    self.listeners, self.addresses.items(), strict=True
                ):
                    await server.start_serving()
                    shown = f"[{host}]" if ":" in host else host
                    scheme = "https" if name in self.tls else "http"
                    log.info("listening on %s://%s:%d (%s)", scheme, shown, port, name)
                self.started.set()
                await self._stop.wait()
                await self._drain(ctx)
                for task in tasks:
                    task.cancel()  # the group then ends: cancelled children are not errors
        finally:
            ctx.stop()
            for pools in ctx.pools.values():
                for pool in pools:
                    pool.close_all()

    async def _bind(self, loop: asyncio.AbstractEventLoop, ctx: Context) -> None:
        for lc in self.config.listeners:
            name = lc.name
            tls = self.tls.get(name)
            factory: Any
            if lc.redirect is not None:
                factory = lambda cfg=lc.redirect: RedirectConnection(ctx, cfg)  # noqa: E731
            else:
                factory = lambda name=name, tls=tls: ClientConnection(ctx, name, tls)  # noqa: E731
            try:
                server = await loop.create_server(
                    factory,
                    host=lc.host or None,
                    port=lc.port,
                    reuse_address=True,
                    backlog=2048,
                    start_serving=False,
                    ssl=tls.context if tls is not None else None,
                    # a client must finish its handshake as fast as its request head
                    ssl_handshake_timeout=ctx.client_header_timeout if tls is not None else None,
                )
            except OSError:
                for bound in self.listeners:
                    bound.close()
                raise
            self.listeners.append(server)
            sock = server.sockets[0]
            addr = sock.getsockname()
            self.addresses[name] = (str(addr[0]), int(addr[1]))
            for s in server.sockets:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _drain(self, ctx: Context) -> None:
        log.info("shutting down: no new connections, draining in-flight requests")
        for server in self.listeners:
            server.close()
        ctx.draining = True
        ctx.close_idle_clients()
        deadline = asyncio.get_running_loop().time() + self.config.timeouts.drain
        while ctx.clients and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            ctx.close_idle_clients()
        if ctx.clients:
            log.warning("drain timeout: closing %d connections", len(ctx.clients))
            for c in list(ctx.clients):
                c.close()
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
            "tls": {name: tls.statistics() for name, tls in self.tls.items()},
        }

    def __repr__(self) -> str:
        return f"Server({len(self.config.listeners)} listeners, {len(self.table.groups)} upstreams)"


def _probe_with(tls: tuple[ClientTls | None, ...] | None) -> Probe:
    """The active-check probe for a group: over TLS to its https:// backends."""
    if tls is None:
        return probe_backend

    async def probe(backend: Backend, hc: HealthCheckConfig) -> ProbeResult:
        return await probe_backend(backend, hc, tls[backend.index])

    return probe


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(config: Config) -> int:
    """Run a Server until SIGTERM/SIGINT; return the process exit code."""
    install_uvloop()

    async def main() -> None:
        server = Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    asyncio.run(main())
    return 0
