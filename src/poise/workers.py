"""``poise run --workers N``: N worker processes serve the traffic; one supervisor checks
health, follows the registry and answers the admin API, once for all of them.

Theory of operation
-------------------
The supervisor creates the listening sockets: for each listener, one socket per worker slot,
all bound to the same address with SO_REUSEPORT, so the kernel spreads new connections over
the slots (a port 0 is chosen once, by the first socket). Worker i runs as
``python -m poise.workers FD`` with slot i's sockets and one end of a Unix socket pair, its
*link*. The supervisor keeps its own copies of the sockets open: that is what makes a
worker's replacement lossless, since connections waiting in a slot's accept queue while its
worker changes are accepted by the next worker instead of being reset.

The supervisor runs a ``Server`` in the ``control`` role: health checks, registry follow,
file and DNS sources, the admin API and reloads, each once. Every change it makes to shared
state goes to every worker over its link, in order (pickled, length-prefixed; the messages
are the frozen dataclasses of ``poise.messages``):

    Members(group, backends, reported, initial)   membership (registry, source, admin)
    Health(group, up)                             active-check verdicts by backend index
    Passed(group, index, started)                 a probe passed (may end an ejection)
    State(group, backend, state)                  operator state: drain, maint, enabled
    Reload(config)                                a new configuration, with discovered
                                                  backends filled in
    Sync({group: GroupState})                     the whole shared state: after each reload
                                                  (at a worker's start it comes in its Init)
    Tickets({listener: {period: secret}})         TLS session ticket secrets, at each
                                                  rotation (tls/tickets.py); at a worker's
                                                  start they come in its Init

A worker applies them to its own ``Server`` (role ``worker``) through the methods a single
process uses, so it computes the same routing table. What a worker learns from its own
traffic stays its own: passive ejections (each worker sees its share of the failures, like
one nginx or HAProxy process per core), in-flight counts, keep-alive pools.

Workers send ``Ready()`` once serving and ``Report(snapshot)`` every second: their
``poise.dataplane`` numbers, which the supervisor sums for /metrics and the admin API.

Lifecycle: SIGTERM or SIGINT to the supervisor drains every worker (each finishes its
in-flight requests within ``timeouts.drain``), then it exits; SIGHUP reloads; SIGUSR2 (or
``POST /v1/workers/restart``) restarts the workers one at a time: a new worker takes slot i's
sockets and, once it serves, the old one drains and exits. A worker that dies is started
again (after 1 s, doubling up to 30 s while it keeps dying within a minute). A worker whose
link closes (the supervisor is gone) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import dataclasses
import logging
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Generic, TypeVar, assert_never, cast

from poise.config.model import Config
from poise.dataplane import Snapshot, counters_only, merge
from poise.logs import JsonFormatter
from poise.messages import (
    GroupState,
    Health,
    Init,
    Members,
    Passed,
    Ready,
    Reload,
    Replicated,
    Report,
    State,
    Sync,
    Tickets,
    ToSupervisor,
    ToWorker,
)
from poise.server import BACKLOG, Server, install_uvloop

log = logging.getLogger("poise.workers")

READY_TIMEOUT = 60.0  # a new worker must be serving within this (imports, TLS contexts)
REPORT_EVERY = 1.0  # seconds between a worker's reports
RESPAWN_FIRST, RESPAWN_MAX = 1.0, 30.0  # back-off for a worker that keeps dying
YOUNG = 60.0  # a worker dying sooner than this after its start doubles the back-off
_HEADER = struct.Struct(">I")


def _mapping(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


# frozen configs hold mapping proxies, which pickle cannot copy by itself
copyreg.pickle(MappingProxyType, lambda m: (_mapping, (dict(m),)))


In = TypeVar("In", ToWorker, ToSupervisor)


def frame(message: ToWorker | ToSupervisor) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class Link(asyncio.Protocol, Generic[In]):
    """One end of a supervisor-worker link: frames out, frames in (to ``on_message``)."""

    def __init__(self, on_message: Callable[[In], None]) -> None:
        self.on_message: Callable[[In], None] = on_message
        self.transport: asyncio.WriteTransport | None = None
        self.buf = bytearray()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        start = 0
        while len(buf) - start >= 4:
            (n,) = _HEADER.unpack_from(buf, start)
            if len(buf) - start - 4 < n:
                break
            # our own child or parent: what it sends is checked where it is dispatched
            message = cast(In, pickle.loads(bytes(buf[start + 4 : start + 4 + n])))
            start += 4 + n
            self.on_message(message)
        del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def send(self, message: ToWorker | ToSupervisor) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- the supervisor -----------------------------------------------------------------------------


def listen_sockets(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """``count`` sets of listening sockets on (host, port) with SO_REUSEPORT: one socket per
    address (IPv4 and IPv6 for an empty host) in each set. Port 0 becomes one port for all."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[Any] = set()
    slots: list[list[socket.socket]] = [[] for _ in range(count)]
    chosen = port
    try:
        for family, kind, proto, _, sockaddr in infos:
            if sockaddr in seen:
                continue
            seen.add(sockaddr)
            for slot in slots:
                s = socket.socket(family, kind, proto)
                slot.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((sockaddr[0], chosen, *sockaddr[2:]))
                chosen = s.getsockname()[1]
                s.listen(BACKLOG)
                s.setblocking(False)
    except OSError:
        for slot in slots:
            for s in slot:
                s.close()
        raise
    return slots


@dataclasses.dataclass(eq=False)
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    link: Link[ToSupervisor]
    started: float  # time.time() at spawn
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    report: Snapshot | None = None
    retiring: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> dict[str, Any]:
        report = self.report or {}
        return {
            "slot": self.slot,
            "pid": self.pid,
            "state": "draining" if self.retiring else "serving" if self.ready.is_set()
            else "starting",
            "uptime_s": round(time.time() - self.started, 3),
            "requests": report.get("stats", {}).get("requests", 0),
            "clients": report.get("clients", 0),
        }  # fmt: skip


class Supervisor:
    def __init__(self, config: Config, workers: int, *, watch_config: bool = False) -> None:
        if workers < 1:
            raise ValueError("workers: at least 1")
        self.n = workers
        self.server = Server(config, watch_config=watch_config, role="control")
        self.server.membership.replicate = self._replicate
        self.server.dataplane = self.dataplane
        self.server.workers = self.describe
        self.server.restart_workers = self.rolling_restart
        self.sockets: list[dict[str, list[socket.socket]]] = []  # by slot, by listener
        self.current: list[Worker | None] = [None] * workers
        self.alive: set[Worker] = set()  # started and not yet exited (also draining ones)
        self.retired: Snapshot = {}  # counters of the workers that have exited
        self.restarts = 0  # workers started again after dying
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._roll = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return self.server.addresses

    def stop(self) -> None:
        self._stop.set()

    # -- state out -------------------------------------------------------------------------

    def _replicate(self, message: Replicated) -> None:
        if isinstance(message, Reload):
            self._broadcast(Reload(self._resolved()))
            self._broadcast(Sync(self._sync()))
            return
        self._broadcast(message)

    def _broadcast(self, message: ToWorker) -> None:
        data = frame(message)
        for worker in self.alive:
            transport = worker.link.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def _resolved(self) -> Config:
        """The config in force, each upstream with the backends it has now (discovered from
        the registry, a file or DNS, or changed through the admin API)."""
        groups = self.server.table.groups
        config = self.server.config
        upstreams = {
            name: dataclasses.replace(ucfg, backends=groups[name].config.backends)
            if name in groups
            else ucfg
            for name, ucfg in config.upstreams.items()
        }
        return dataclasses.replace(config, upstreams=MappingProxyType(upstreams))

    def _sync(self) -> dict[str, GroupState]:
        return self.server.membership.shared_state()

    def _ticket_secrets(self) -> dict[str, dict[int, bytes]]:
        """Every HTTPS listener's session ticket secrets (tls/tickets.py): generated here,
        so that every worker, and every worker started later, has the same."""
        return {
            name: tls.secrets.export()
            for name, tls in self.server.tls.items()
            if tls.secrets is not None
        }

    async def _rotate_tickets(self) -> None:
        """At the start of each ticket key period, the next period's secret to the workers
        (they have the current one already, from the previous round)."""
        rings = [tls.secrets for tls in self.server.tls.values() if tls.secrets is not None]
        if not rings:
            return
        while True:
            await asyncio.sleep(min(r.next_change() for r in rings) + 0.01)
            self._broadcast(Tickets(self._ticket_secrets()))

    # -- numbers in ------------------------------------------------------------------------

    def dataplane(self) -> Snapshot:
        total: Snapshot = merge(self.server.own_numbers(), self.retired)
        for worker in self.alive:
            if worker.report is not None:
                total = merge(total, worker.report)
        return total

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in sorted(self.alive, key=lambda w: (w.slot, w.started))]

    def _on_message(self, worker: Worker, message: ToSupervisor) -> None:
        match message:
            case Report(snapshot=numbers):
                worker.report = numbers
            case Ready():
                worker.ready.set()
            case _:
                assert_never(message)

    # -- workers ---------------------------------------------------------------------------

    async def _spawn(self, slot: int) -> Worker:
        """Start a worker for ``slot`` and wait until it serves; raises RuntimeError if it
        exits or does not serve within READY_TIMEOUT."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {name: [s.fileno() for s in socks] for name, socks in self.sockets[slot].items()}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "poise.workers",
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), *(fd for fl in fds.values() for fd in fl)],
            )
        finally:
            theirs.close()
        holder: list[Worker] = []
        link: Link[ToSupervisor] = Link(lambda message: self._on_message(holder[0], message))
        await loop.create_unix_connection(lambda: link, sock=ours)
        worker = Worker(slot, process, link, time.time())
        holder.append(worker)
        root = logging.getLogger()
        json_logs = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        level = logging.getLevelName(root.level).lower()
        link.send(
            Init(slot, self._resolved(), fds, level, "json" if json_logs else "text",
                 self._sync(), self._ticket_secrets())
        )  # fmt: skip
        # from here on, every change of state reaches it too, in order after the init
        self.alive.add(worker)
        watch = loop.create_task(self._watch(worker), name=f"worker:{slot}:{process.pid}")
        self._tasks.add(watch)
        watch.add_done_callback(self._tasks.discard)
        ready = loop.create_task(worker.ready.wait())
        exited = loop.create_task(link.closed.wait())
        done, pending = await asyncio.wait(
            {ready, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if not worker.ready.is_set():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise RuntimeError(
                f"worker {slot} (pid {process.pid}) "
                + ("exited before serving" if exited in done else "did not start serving")
            )
        return worker

    async def _watch(self, worker: Worker) -> None:
        """Wait for ``worker`` to exit; keep its counters; start its slot again if it died."""
        code = await worker.process.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await worker.link.closed.wait()  # its last report is read
        worker.link.close()
        self.alive.discard(worker)
        if worker.report is not None:
            self.retired = merge(self.retired, counters_only(worker.report))
        if worker.retiring or self._stopping:
            log.info("worker %d (pid %d) exited (%s)", worker.slot, worker.pid, code)
            return
        log.error("worker %d (pid %d) died (exit status %s): starting it again",
                  worker.slot, worker.pid, code)  # fmt: skip
        if self.current[worker.slot] is worker:
            self.current[worker.slot] = None
        await self._respawn(worker.slot, time.time() - worker.started)

    async def _respawn(self, slot: int, lived: float) -> None:
        delay = RESPAWN_FIRST
        while not self._stopping:
            if lived < YOUNG:
                await asyncio.sleep(delay)
            if self._stopping or self.current[slot] is not None:
                return
            started = time.time()
            try:
                self.current[slot] = await self._spawn(slot)
                self.restarts += 1
                return
            except (RuntimeError, OSError) as exc:
                log.error("worker %d: %s; trying again in %.0f s", slot, exc, delay)
                lived = time.time() - started
                delay = min(delay * 2, RESPAWN_MAX)

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGTERM)

    async def rolling_restart(self) -> dict[str, Any]:
        """Replace every worker, one at a time: the new one serves before the old one drains.
        Raises RuntimeError (and keeps the old worker) if a new one does not start."""
        async with self._roll:
            replaced: list[dict[str, int | None]] = []
            for slot in range(self.n):
                if self._stopping:
                    break
                old = self.current[slot]
                new = await self._spawn(slot)
                self.current[slot] = new
                if old is not None:
                    self._retire(old)
                    replaced.append({"slot": slot, "old_pid": old.pid, "new_pid": new.pid})
                else:
                    replaced.append({"slot": slot, "old_pid": None, "new_pid": new.pid})
            log.info("rolling restart done: %d workers replaced", len(replaced))
            return {"restarted": replaced}

    def request_restart(self) -> None:
        """SIGUSR2: a rolling restart in the background; the outcome is logged."""

        async def roll() -> None:
            try:
                await self.rolling_restart()
            except (RuntimeError, OSError) as exc:
                log.error("rolling restart stopped: %s", exc)

        task = asyncio.get_running_loop().create_task(roll(), name="workers:restart")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle -------------------------------------------------------------------------

    def _bind(self) -> None:
        self.sockets = [{} for _ in range(self.n)]
        try:
            for lc in self.server.config.listeners:
                per_slot = listen_sockets(lc.host, lc.port, self.n)
                for slot, socks in enumerate(per_slot):
                    self.sockets[slot][lc.name] = socks
                    for s in socks:
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                addr = per_slot[0][0].getsockname()
                self.server.addresses[lc.name] = (str(addr[0]), int(addr[1]))
        except OSError:
            self._close_sockets()
            raise

    def _close_sockets(self) -> None:
        for slot in self.sockets:
            for socks in slot.values():
                for s in socks:
                    s.close()
        self.sockets = []

    async def serve(self) -> None:
        self._bind()
        server = self.server
        control = asyncio.get_running_loop().create_task(server.serve(), name="control")
        try:
            started = asyncio.ensure_future(server.started.wait())
            await asyncio.wait({started, control}, return_when=asyncio.FIRST_COMPLETED)
            if control.done():
                started.cancel()
                await control  # raises what stopped it
                return
            spawning: asyncio.Future[Any] = asyncio.gather(
                *(self._spawn(slot) for slot in range(self.n)), return_exceptions=True
            )
            stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({spawning, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not spawning.done():  # stopped while starting: the shutdown ends the new ones
                spawning.cancel()
                return
            stop.cancel()
            workers = spawning.result()
            failed = [w for w in workers if isinstance(w, BaseException)]
            for slot, worker in enumerate(workers):
                if isinstance(worker, Worker):
                    self.current[slot] = worker
            if failed:
                raise RuntimeError(f"workers did not start: {failed[0]}")
            for lc in server.config.listeners:
                host, port = server.addresses[lc.name]
                shown = f"[{host}]" if ":" in host else host
                scheme = "https" if lc.name in server.tls else lc.protocol
                log.info("listening on %s://%s:%d (%s, %d workers)",
                         scheme, shown, port, lc.name, self.n)  # fmt: skip
            self.started.set()
            rotate = asyncio.get_running_loop().create_task(self._rotate_tickets())
            try:
                await self._stop.wait()
            finally:
                rotate.cancel()
        finally:
            await self._shutdown(control)

    async def _shutdown(self, control: asyncio.Task[None]) -> None:
        self._stopping = True
        # Our copies first: once the workers close theirs, nothing listens any more.
        self._close_sockets()
        for worker in list(self.alive):
            self._retire(worker)
        limit = self.server.config.timeouts.drain + 10.0
        waits = [w.process.wait() for w in self.alive]
        if waits:
            try:
                async with asyncio.timeout(limit):
                    await asyncio.gather(*waits)
            except TimeoutError:
                for worker in list(self.alive):
                    log.error("worker %d (pid %d) did not exit: killed", worker.slot, worker.pid)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.server.stop()
        await control

    def __repr__(self) -> str:
        return f"Supervisor({len(self.alive)} workers of {self.n})"


def run(config: Config, workers: int, *, watch_config: bool = False) -> int:
    """Run a supervisor and its workers until SIGTERM/SIGINT; return the exit code."""
    install_uvloop()

    async def main() -> None:
        sup = Supervisor(config, workers, watch_config=watch_config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.stop)
        loop.add_signal_handler(signal.SIGHUP, sup.server.request_reload)
        loop.add_signal_handler(signal.SIGUSR2, sup.request_restart)
        await sup.serve()

    asyncio.run(main())
    return 0


# -- a worker ----------------------------------------------------------------------------------


async def apply(server: Server, message: ToWorker) -> None:
    """Apply one message from the control process (see the module docstring)."""
    membership = server.membership
    match message:
        case Members(group, backends, reported, initial):
            membership.set_members(group, backends, reported, initial=initial)
        case Health(group, up):
            membership.board.active(group, up)
        case Passed(group, index, started):
            membership.board.probe_passed(group, index, started)
        case State(group, backend, state):
            membership.board.set_state(group, backend, state)
        case Reload(config):
            await server.reload(config)
        case Sync(state):
            membership.apply_shared(state)
        case Tickets(secrets):
            for name, ring in secrets.items():
                tls = server.tls.get(name)
                if tls is not None and tls.secrets is not None:
                    tls.secrets.install(ring)
        case Init():
            raise ValueError("a second init")
        case _:
            assert_never(message)


async def _worker(fd: int) -> int:
    from poise.logs import setup_logging

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[ToWorker] = asyncio.Queue()
    link: Link[ToWorker] = Link(inbox.put_nowait)
    await loop.create_unix_connection(lambda: link, sock=socket.socket(fileno=fd))
    init = await inbox.get()
    if not isinstance(init, Init):
        raise RuntimeError(f"expected an init first, got {type(init).__name__}")
    slot = init.slot
    setup_logging(init.level, init.log_format, worker=slot)
    sockets = {name: [socket.socket(fileno=f) for f in fl] for name, fl in init.fds.items()}
    server = Server(init.config, role="worker", sockets=sockets, ticket_secrets=init.tickets)
    server.membership.apply_shared(init.state)
    for sig in (signal.SIGHUP, signal.SIGUSR2):
        loop.add_signal_handler(sig, lambda: None)  # the supervisor's business
    loop.add_signal_handler(signal.SIGTERM, server.stop)
    serving = loop.create_task(server.serve(), name="serve")
    status = 0

    async def consume() -> None:
        nonlocal status
        while True:
            message = await inbox.get()
            try:
                await apply(server, message)
            except Exception:
                # its state would drift from the others': better a fresh start from a sync
                log.exception(
                    "worker %d: could not apply %s; exiting", slot, type(message).__name__
                )
                status = 1
                server.stop()
                return

    async def report() -> None:
        await server.started.wait()
        link.send(Ready())
        while True:
            link.send(Report(server.own_numbers()))
            await asyncio.sleep(REPORT_EVERY)

    async def orphaned() -> None:
        await link.closed.wait()
        log.warning("worker %d: the supervisor is gone; draining", slot)
        server.stop()

    helpers = [loop.create_task(c) for c in (consume(), report(), orphaned())]
    try:
        await serving
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        link.send(Report(server.own_numbers()))
        link.close()
    return status


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m poise.workers FD (started by poise run --workers N)",
              file=sys.stderr)  # fmt: skip
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains us
    install_uvloop()
    return asyncio.run(_worker(int(argv[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
