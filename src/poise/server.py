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

from poise.config.model import Config
from poise.health.board import HealthBoard
from poise.health.checker import GroupChecker
from poise.health.status import View
from poise.l4 import L4
from poise.l7.client import ClientConnection
from poise.l7.context import Context
from poise.routing import build_table, make_backends

BOARD_TICK = 0.25  # seconds between ends of ejections / slow-start steps being applied

log = logging.getLogger("poise.server")


class Server:
    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        backends = {name: make_backends(up) for name, up in config.upstreams.items()}
        self.board = HealthBoard(config.upstreams, backends, time.monotonic)
        self.table = build_table(config, self.rng, self.board.statuses)
        self.l4 = L4(config, self.table, self.rng.random)  # the TCP listeners, if any
        self.ctx: Context | None = None
        self.checkers: list[GroupChecker] = []
        self.listeners: list[asyncio.Server] = []
        self.addresses: dict[str, tuple[str, int]] = {}  # listener name -> bound address
        self.started = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def publish_health(self, group: str, up: tuple[bool, ...]) -> None:
        """The active checks' verdicts for ``group`` (called by its GroupChecker)."""
        self.board.active(group, up)

    def set_backend_state(self, group: str, backend: str, state: str) -> None:
        """Operator state of a backend ("http://host:port" or "host:port"): "enabled",
        "drain" (no new requests but sticky ones; in-flight ones finish) or "maint"."""
        self.board.set_state(group, backend, state)

    def _install(self, group: str, view: View) -> None:
        """Swap in a routing table with ``group``'s new view: one assignment."""
        table = self.ctx.table if self.ctx is not None else self.table
        new = table.with_group(table.groups[group].with_view(view))
        if self.ctx is not None:
            self.ctx.table = new
        self.table = self.l4.table = new

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(BOARD_TICK)
            self.board.tick()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ctx = Context(self.config, self.table, loop)
        for group in self.table.groups.values():
            if group.admission is not None:
                group.admission.set_scheduler(loop.call_soon)
        self.board.install = self._install
        ctx.on_ejected = self.l4.on_ejected = self.board.ejected
        # Bind first, so a taken port fails plainly before anything else starts; accept only
        # after the first health round.
        await self._bind(loop, ctx)
        ctx.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tg:
                tasks.append(tg.create_task(self._maintain(), name="health:board"))
                tasks.append(tg.create_task(self.l4.run(), name="l4"))
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
                await self.l4.ready.wait()
                for server, lc, (name, (host, port)) in zip(
                    self.listeners, self.config.listeners, self.addresses.items(), strict=True
                ):
                    await server.start_serving()
                    shown = f"[{host}]" if ":" in host else host
                    log.info("listening on %s://%s:%d (%s)", lc.protocol, shown, port, name)
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
            tcp = self.l4.listeners.get(name) if lc.tcp is not None else None
            try:
                server = await loop.create_server(
                    tcp.factory
                    if tcp is not None
                    else lambda name=name: ClientConnection(ctx, name),
                    host=lc.host or None,
                    port=lc.port,
                    reuse_address=True,
                    backlog=2048,
                    start_serving=False,
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
        self.l4.draining = True  # TCP relays have no idle moment: they get the whole drain time
        deadline = asyncio.get_running_loop().time() + self.config.timeouts.drain
        while (ctx.clients or self.l4.active()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            ctx.close_idle_clients()
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
            "l4": self.l4.statistics(),
        }

    def __repr__(self) -> str:
        return f"Server({len(self.config.listeners)} listeners, {len(self.table.groups)} upstreams)"


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
