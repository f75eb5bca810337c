"""TCP (L4) listeners: accept, choose a backend with the group's policy, connect, relay.

Theory of operation
-------------------
``L4`` is one worker's TCP side; it holds a ``TcpListener`` per configured TCP listener, the
current routing table (the same ``Group``s, pickers, health view and load figures the HTTP
side uses: a group may serve both), the shared read buffer, and the one coarse sweep.

Per accepted connection: a ``Relay`` is made by the protocol factory; over
``max_connections`` the client is closed at once. From a trusted peer (``accept_proxy``)
the connection must open with a PROXY header (v1 or v2, ``proxy_protocol``); its addresses
then stand for the client. A listener with ``sni`` routes then peeks at the TLS ClientHello
(``l4.sni``) to choose the relay's upstream (``relay.group``; else the listener's own
``upstream``): one listener may feed several groups, so everything per group follows the
relay's. Then a connect task (in ``L4.run``'s TaskGroup) walks the policy's
candidates (``Picker.candidates(key)``, the key being the client address for hashing
policies), skipping backends that are down, already tried, at their limits or passed over
by slow start, and connects. A refused, failed or timed-out connect (nothing has been relayed
yet, so trying elsewhere is always safe) counts against the backend's passive health and
moves on to another backend, up to the group's ``retry.attempts`` when ``connect`` is among
``retry.on``; when none is left the client is closed. A relay counts in its backend's load
(``least_conn``, ``p2c``) from the connect until it closes.

Timeouts without timers: every ``TICK`` the sweep compares each relay with its deadline
(PROXY header and ClientHello, together: ``timeouts.client_header``; connect:
``connect_timeout``, cancelling the connect task, which goes on to the next backend) or, while
relaying, the bytes it has moved with the count at the previous sweep (``idle_timeout``). The
hot path never reads a clock.

Once connected, a relay's two sockets go to the L4's C pump (``l4/_pump.c``) when it was
built: ``hand_over`` duplicates both descriptors into it and closes the transports, and
the pump moves the bytes with no Python call per message, until both directions have ended
or a socket fails (``pump_ended``). A relay is handed over only with nothing buffered in
either transport and no end-of-stream seen yet; otherwise, and without the pump, the
relay's two protocols move the bytes (``l4/relay.py``, the pump's pure-Python twin).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any

from poise.config.model import Config, ListenerConfig, TcpListenerConfig
from poise.l4 import proxy_protocol
from poise.l4.relay import Back, End, Front, Phase, Relay
from poise.l4.sni import SniRouter
from poise.models import Backend
from poise.netreasons import describe_error
from poise.routing import Group, RoutingTable
from poise.selection import release, select, take

try:
    import poise.l4._pump as _pump_module
except ImportError:  # the pure-Python build (or no compiler at install time)
    PUMP: Any = None
else:
    PUMP = _pump_module

log = logging.getLogger("poise.l4")

TICK = 0.25


@dataclass(slots=True)
class ListenerStats:
    """Plain integer counters, read on demand."""

    accepted: int = 0
    refused: int = 0  # over max_connections
    closed: int = 0
    connect_errors: int = 0  # failed connect attempts, timeouts included
    connect_timeouts: int = 0
    retries: int = 0  # connects to a further backend after a failure
    no_backend: int = 0  # clients closed: no usable backend, or every try failed
    idle_timeouts: int = 0
    proxy_errors: int = 0  # missing, malformed or late PROXY headers from trusted peers
    sni_timeouts: int = 0  # clients closed: no complete ClientHello by client_header
    sni_unreadable: int = 0  # not a TLS ClientHello (or cut short): the default upstream
    backend_resets: int = 0
    bytes_in: int = 0  # client -> backend, of closed relays (live ones are added on read)
    bytes_out: int = 0  # backend -> client

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class BackendCounters:
    """Per-backend counters of one group, by backend id ("host:port"): membership may change
    (registry, files, DNS, the admin API) and the counters follow the backend, not its index."""

    __slots__ = ("active", "bytes_in", "bytes_out", "connections", "failures")

    def __init__(self) -> None:
        self.active: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()


def _address(value: object) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return ("", 0)


class TcpListener:
    __slots__ = (
        "cfg",
        "connect_timeout",
        "header_timeout",
        "hub",
        "lingering",
        "name",
        "relays",
        "sni",
        "sni_routes",
        "stats",
        "trusted",
    )

    def __init__(self, hub: L4, lc: ListenerConfig, cfg: TcpListenerConfig) -> None:
        self.hub = hub
        self.name = lc.name
        self.cfg = cfg
        timeouts = hub.config.timeouts
        self.connect_timeout = cfg.connect_timeout or timeouts.upstream_connect
        self.header_timeout = timeouts.client_header
        self.trusted = tuple(ipaddress.ip_network(n) for n in cfg.accept_proxy)
        self.relays: set[Relay] = set()
        # closed relays' sides still flushing, with the time by which they must be done
        self.lingering: dict[End, float] = {}
        self.stats = ListenerStats()
        self.sni = SniRouter(cfg.upstream, cfg.sni) if cfg.sni else None
        self.sni_routes: Counter[str] = Counter()  # peeked connections, by upstream chosen

    def factory(self) -> Front:
        return Front(self)

    # -- called by the relay -----------------------------------------------------------

    def accepted(self, relay: Relay, transport: asyncio.Transport) -> None:
        stats = self.stats
        limit = self.cfg.max_connections
        if self.hub.draining or (limit and len(self.relays) >= limit):
            stats.refused += 1
            relay.phase = Phase.CLOSED
            transport.abort()
            return
        stats.accepted += 1
        self.relays.add(relay)
        relay.client = _address(transport.get_extra_info("peername"))
        relay.local = _address(transport.get_extra_info("sockname"))
        relay.last = now = self.hub.clock()
        # one deadline for what the client owes before a backend is chosen: header, hello.
        # Deadlines are counted from the clock read now, not the sweep's ``now`` (up to a
        # tick old): a timeout must never fire before its configured value.
        relay.deadline = now + self.header_timeout
        if self.trusted and self._is_trusted(relay.client[0]):
            relay.phase = Phase.HEADER
            return
        self._begin(relay)

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)

    def header_data(self, relay: Relay) -> None:
        """Bytes from a trusted peer that owes us a PROXY header."""
        try:
            header = proxy_protocol.decode(relay.pending)
        except proxy_protocol.ProxyProtocolError as exc:
            self.stats.proxy_errors += 1
            log.debug("%s: bad PROXY header from %s: %s", self.name, relay.client[0], exc)
            relay.close()
            return
        if header is None:
            return
        del relay.pending[: header.length]
        if header.source is not None and header.destination is not None:
            relay.client, relay.local = header.source, header.destination
        self._begin(relay)

    def _begin(self, relay: Relay) -> None:
        """Accepted (and past its PROXY header): peek at the ClientHello, or connect."""
        if self.sni is None:
            self._start(relay)
            return
        relay.phase = Phase.PEEK
        if relay.pending or relay.front.eof:  # bytes that came with the PROXY header
            self.peek_data(relay)

    def peek_data(self, relay: Relay) -> None:
        """More bytes (or the client's EOF) while peeking: route once the ClientHello has
        been read, or found not to be one."""
        assert self.sni is not None
        found = self.sni.peek(bytes(relay.pending), eof=relay.front.eof)
        if found is None:
            return
        relay.group, readable = found
        if not readable:
            self.stats.sni_unreadable += 1
        self.sni_routes[relay.group] += 1
        self._start(relay)

    def _start(self, relay: Relay) -> None:
        relay.phase = Phase.CONNECTING
        # The deadline is set now, not when the task first runs: a sweep may come first.
        relay.deadline = self.hub.clock() + self.connect_timeout
        if self.hub.stopped:  # a PROXY header completed after shutdown began
            relay.close()
            return
        relay.task = task = self.hub.spawn(self._connect(relay))
        task.add_done_callback(relay.connect_done)

    def proxy_header(self, relay: Relay) -> bytes:
        version = self.cfg.proxy_protocol
        if not version:
            return b""
        return proxy_protocol.encode(version, relay.client, relay.local)

    def linger(self, end: End) -> None:
        self.lingering[end] = self.hub.clock() + self.cfg.idle_timeout

    def connected(self, relay: Relay, backend: Backend) -> None:
        self.hub.counters(relay.group).connections[backend.id] += 1

    def finished(self, relay: Relay) -> None:
        """The relay closed: fold its counters in, take it out of its backend's load."""
        self.relays.discard(relay)
        stats = self.stats
        stats.closed += 1
        stats.bytes_in += relay.front.count
        back = relay.back
        if back is not None:
            stats.bytes_out += back.count
            counters = self.hub.counters(relay.group)
            counters.bytes_in[back.backend.id] += relay.front.count
            counters.bytes_out[back.backend.id] += back.count
        if relay.backend is not None:
            self._release(relay, ok=True, latency=relay.connect_time)

    # -- choosing and connecting ---------------------------------------------------------

    def _choose(self, group: Group, relay: Relay) -> Backend | None:
        """The first candidate that is up, untried and not at a limit; slow start passes a
        ramping backend over with probability 1 - ramp (taken if nothing else is left)."""
        key = relay.client[0].encode() if group.key is not None else None
        return select(group, key, relay.tried, self.hub.rng)[0]

    def _take(self, group: Group, relay: Relay, backend: Backend) -> None:
        """Count ``relay`` in ``backend``'s load: in the Load and Admission of the group as it
        is now, which ``_release`` uses again even if membership changes meanwhile."""
        relay.backend = backend
        self.hub.counters(group.name).active[backend.id] += 1
        relay.load, relay.admission = take(group, backend)

    def _release(self, relay: Relay, *, ok: bool, latency: float) -> None:
        backend = relay.backend
        if backend is None:
            return
        relay.backend = None
        self.hub.counters(relay.group).active[backend.id] -= 1
        load, adm = relay.load, relay.admission
        relay.load = relay.admission = None
        now = time.monotonic() if load is not None and load.latency else 0.0
        release(load, adm, backend.index, ok=ok, latency=latency, now=now)

    async def _connect(self, relay: Relay) -> None:
        try:
            await self._connect_loop(relay)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, not a backend failure: keep serving, and say so loudly
            log.exception("%s: internal error while connecting %r", self.name, relay)
            relay.close(reset=True)

    async def _connect_loop(self, relay: Relay) -> None:
        hub, stats = self.hub, self.stats
        loop = hub.loop
        task = asyncio.current_task()
        group = hub.table.groups[relay.group]
        retry = group.config.retry
        attempts = retry.attempts if "connect" in retry.on else 1
        while not relay.closed:
            backend = self._choose(group, relay)
            if backend is None:
                break
            if relay.tried:
                stats.retries += 1
            relay.tried = (*relay.tried, backend)
            self._take(group, relay, backend)
            back = Back(relay, backend)
            relay.attempt, relay.expired = back, False
            relay.deadline = hub.clock() + self.connect_timeout
            started = loop.time()
            try:
                await loop.create_connection(lambda b=back: b, backend.host, backend.port)  # type: ignore[misc]
            except asyncio.CancelledError:
                if not relay.expired or task is None or task.uncancel() > 0:
                    raise  # shutdown, or the client went away: finished() releases the load
                reason = f"connect timeout {self.connect_timeout:g}s"
                stats.connect_timeouts += 1
            except OSError as exc:
                reason = describe_error(exc)
            else:
                if relay.back is back:
                    relay.connect_time = loop.time() - started
                    if group.outliers is not None and group.outliers.any_streak:
                        group.outliers.success(backend.index)
                return
            self._release(relay, ok=False, latency=loop.time() - started)
            self._failed(group, backend, reason)
            if len(relay.tried) >= attempts:
                break
            group = hub.table.groups.get(group.name, group)  # health may have changed
        if not relay.closed:
            stats.no_backend += 1
            relay.close()

    def _failed(self, group: Group, backend: Backend, reason: str) -> None:
        self.stats.connect_errors += 1
        hub = self.hub
        hub.counters(group.name).failures[backend.id] += 1
        log.debug("%s: connect to %s failed: %s", self.name, backend.authority, reason)
        outliers = group.outliers
        if outliers is not None and outliers.failure(backend.index, hub.loop.time(), reason):
            hub.on_ejected(group.name, backend.index)

    # -- the sweep -------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        idle = self.cfg.idle_timeout
        expired: list[Relay] = []
        for relay in self.relays:
            if relay.phase is Phase.RELAYING:
                relay.sync()
                back = relay.back
                moved = relay.front.count + (back.count if back is not None else 0)
                if moved != relay.seen:
                    relay.seen, relay.last = moved, now
                elif now - relay.last >= idle:
                    expired.append(relay)
            elif relay.deadline < now and not relay.expired:
                expired.append(relay)
        late = [end for end, deadline in self.lingering.items() if deadline < now]
        for end in late:
            del self.lingering[end]
            end.transport.abort()  # a peer that takes nothing more: its bytes are lost anyway
        for relay in expired:
            if relay.phase is Phase.RELAYING:
                self.stats.idle_timeouts += 1
            elif relay.phase is Phase.HEADER:
                self.stats.proxy_errors += 1
            elif relay.phase is Phase.PEEK:
                self.stats.sni_timeouts += 1
            relay.on_timeout()

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = self.stats.as_dict()
        for relay in self.relays:  # live relays' bytes, so long connections show progress
            relay.sync()
            out["bytes_in"] += relay.front.count
            if relay.back is not None:
                out["bytes_out"] += relay.back.count
        out["active"] = len(self.relays)
        if self.sni is not None:
            out["sni_routes"] = dict(self.sni_routes)
        return out

    def __repr__(self) -> str:
        return f"TcpListener({self.name} -> {self.cfg.upstream}, {len(self.relays)} relays)"


class L4:
    """One worker's TCP listeners, their connect tasks and the sweep."""

    def __init__(
        self, config: Config, current: Callable[[], RoutingTable], rng: Callable[[], float]
    ) -> None:
        self.config = config
        # the server's current routing table (swapped whole on every health or membership
        # change): read per connection, never cached
        self._current = current
        self.rng = rng
        self.listeners = {
            lc.name: TcpListener(self, lc, lc.tcp) for lc in config.listeners if lc.tcp is not None
        }
        self._counters: dict[str, BackendCounters] = {}
        self.clock: Callable[[], float] = time.monotonic  # what deadlines are counted on
        self.now = 0.0
        self.draining = False
        self.stopped = False  # run() has ended: no more connect tasks
        self.ready = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pump: Any = None  # the C pump while run() runs (PUMP.Pump), or None
        self.pumped: dict[int, Relay] = {}  # by pump id
        # passive health ejected a backend (group, index): the server re-routes around it
        self.on_ejected: Callable[[str, int], None] = lambda group, index: None

    @property
    def table(self) -> RoutingTable:
        return self._current()

    def counters(self, group: str) -> BackendCounters:
        c = self._counters.get(group)
        if c is None:
            c = self._counters[group] = BackendCounters()
        return c

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "L4.run() has not started"
        return self._loop

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tg is not None, "L4.run() is not running"
        return self._tg.create_task(coro)

    async def run(self) -> None:
        """The sweep and every connect task; cancelling it cancels them all."""
        self._loop = loop = asyncio.get_running_loop()
        self.now = self.clock()
        if PUMP is not None and self.listeners:
            self.pump = PUMP.Pump(self._pump_ended)
            loop.add_reader(self.pump.fileno(), self.pump.run)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self.ready.set()
            try:
                while True:
                    await asyncio.sleep(TICK)
                    self.now = now = self.clock()
                    for listener in self.listeners.values():
                        listener.sweep(now)
            finally:
                self._tg = None
                self.stopped = True
                if self.pump is not None:
                    loop.remove_reader(self.pump.fileno())

    # -- the C pump (l4/_pump.c) ---------------------------------------------------------

    def hand_over(self, relay: Relay) -> None:
        """Give a just connected relay's sockets to the pump (see the module docstring)."""
        pump, back = self.pump, relay.back
        if pump is None or back is None:
            return
        front = relay.front
        ft, bt = front.transport, back.transport
        if front.eof or back.eof or ft.get_write_buffer_size() or bt.get_write_buffer_size():
            return  # bytes or an end still to pass on: the protocols carry on
        fs, bs = ft.get_extra_info("socket"), bt.get_extra_info("socket")
        if fs is None or bs is None:
            return
        client = os.dup(fs.fileno())  # the same open sockets (and their O_NONBLOCK)
        backend = os.dup(bs.fileno())
        try:
            pid = pump.add(client, backend)
        except OSError:
            os.close(client)
            os.close(backend)
            return
        relay.pump_id, relay.pump_base = pid, (front.count, back.count)
        self.pumped[pid] = relay
        front.out = back.out = None
        ft.abort()  # closes the transports' descriptors; the pump's keep the connections
        bt.abort()

    def pump_counts(self, pid: int) -> tuple[int, int] | None:
        return None if self.pump is None else self.pump.counts(pid)

    def pump_close(self, pid: int, *, reset: bool) -> tuple[int, int] | None:
        self.pumped.pop(pid, None)
        return None if self.pump is None else self.pump.close(pid, reset)

    def _pump_ended(self, pid: int, failed: int, client_bytes: int, backend_bytes: int) -> None:
        relay = self.pumped.pop(pid, None)
        if relay is not None:
            relay.pump_ended(failed, client_bytes, backend_bytes)

    def active(self) -> int:
        """Open relays and closed ones still flushing: what a drain waits for."""
        return sum(len(ln.relays) + len(ln.lingering) for ln in self.listeners.values())

    def close_all(self) -> int:
        """End of a drain: close every relay and flush, now."""
        relays = [r for listener in self.listeners.values() for r in listener.relays]
        for relay in relays:
            relay.close(stuck=True)
        for listener in self.listeners.values():
            for end in list(listener.lingering):
                end.transport.abort()
            listener.lingering.clear()
        return len(relays)

    def statistics(self) -> dict[str, Any]:
        backends: dict[str, Any] = {}
        used: set[str] = set()
        live_in: dict[str, Counter[str]] = {}
        live_out: dict[str, Counter[str]] = {}
        for listener in self.listeners.values():
            used.add(listener.cfg.upstream)
            used.update(route.upstream for route in listener.cfg.sni)
            for relay in listener.relays:
                relay.sync()
                back = relay.back
                if back is not None:
                    bid = back.backend.id
                    live_in.setdefault(relay.group, Counter())[bid] += relay.front.count
                    live_out.setdefault(relay.group, Counter())[bid] += back.count
        table = self.table
        empty: Counter[str] = Counter()
        for name in sorted(used):
            c = self.counters(name)
            ins, outs = live_in.get(name, empty), live_out.get(name, empty)
            backends[name] = {
                b.url: {
                    "active": c.active[b.id],
                    "connections": c.connections[b.id],
                    "connect_failures": c.failures[b.id],
                    "bytes_in": c.bytes_in[b.id] + ins[b.id],
                    "bytes_out": c.bytes_out[b.id] + outs[b.id],
                }
                for b in table.groups[name].backends
            }
        return {
            "listeners": {name: ln.statistics() for name, ln in self.listeners.items()},
            "backends": backends,
        }

    def __repr__(self) -> str:
        return f"L4({len(self.listeners)} listeners, {self.active()} relays)"
