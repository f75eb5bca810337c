"""Per-worker state shared by every HTTP connection, and the one coarse timer.

There is no timer per request or per connection: each connection keeps a ``deadline`` float
computed from ``now`` (the loop clock as of the last tick, so the hot path never reads a
clock) and the sweep, every ``TICK`` seconds, expires what is overdue. Timeouts are therefore
accurate to about one tick, which is what proxies need, and cost O(connections) per tick.

A deadline is computed from ``clock()`` read when it is set, never from the coarse ``now``:
``now`` may be a whole tick old, and a deadline counted from it would fire up to a tick
*before* the configured timeout. Read fresh, a timeout fires no earlier than configured and
at most one tick (plus the loop's lag) later. ``now`` stays for what may be early (the pool's
idle expiry, which is meant to beat the backend's own keep-alive timer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from poise.accesslog import AccessLog
from poise.config.model import Config
from poise.l7 import http, scan
from poise.l7.http import DateCache
from poise.routing import RoutingTable
from poise.tls.contexts import ClientTls, group_tls, upstream_tls

if TYPE_CHECKING:
    from poise.health.passive import Outliers
    from poise.l7.client import ClientConnection
    from poise.l7.memo import RequestMemo
    from poise.l7.tunnel import Tunnel
    from poise.l7.upstream import UpstreamConnection

log = logging.getLogger("poise.proxy")

TICK = 0.25
TRUST_CACHE_MAX = 4096  # peer addresses whose is_trusted answer is kept
BODY_RATE_GRACE = 5.0  # seconds before limits.min_body_rate applies to a request body


@dataclass(slots=True)
class Stats:
    """Plain integer counters; exported on demand, never formatted on the hot path.

    Two kinds, kept apart (admin/metrics.py exports them as two families):

    * **answers**: each request poise answered with an error status counts once, under the
      one reason it was answered for: ``bad_requests`` (by status in ``rejects``),
      ``no_route`` (404), ``no_healthy_backend`` (503: no backend up, or none could be
      connected to), ``upstream_errors`` (502), ``upstream_timeouts`` (504),
      ``client_408`` (408), ``queue_full``/``queue_timeouts`` (503),
      ``connections_refused`` (503, too many connections);
    * **attempts**: each attempt at a backend that failed, retried or not:
      ``upstream_connect_errors``, ``attempt_timeouts``, ``attempt_resets`` (lost before a
      response byte), ``attempt_broken`` (lost or malformed mid-response).
    """

    connections_accepted: int = 0
    connections_refused: int = 0
    requests: int = 0
    responses: int = 0
    bad_requests: int = 0
    no_healthy_backend: int = 0
    no_route: int = 0
    upstream_connect_errors: int = 0  # attempts
    attempt_timeouts: int = 0
    attempt_resets: int = 0
    attempt_broken: int = 0
    upstream_timeouts: int = 0  # answers (504)
    upstream_errors: int = 0  # answers (502)
    client_408: int = 0  # answers: a request head or body that did not arrive in time
    retries: int = 0
    retries_over_budget: int = 0  # retries refused by the retry budget
    ejections: int = 0  # backends ejected by passive health
    queued: int = 0  # requests that waited for a free slot (upstream limits)
    queue_full: int = 0  # refused: the queue was full
    queue_timeouts: int = 0  # refused: no slot within the queue timeout
    tunnels: int = 0
    client_timeouts: int = 0
    redirects: int = 0  # answered by a redirect_https listener
    http2_connections: int = 0  # client connections that spoke HTTP/2 (h2/front.py)
    http2_requests: int = 0  # of ``requests``, those on HTTP/2 streams

    # bad requests by the status they were answered with (400, 413, 414, 431, 501, 505)
    rejects: dict[int, int] = field(default_factory=dict)

    def count(self, counter: str) -> None:
        """One more of ``counter`` (a field named by failures.py's table)."""
        setattr(self, counter, getattr(self, counter) + 1)

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rejects"}
        for status, n in self.rejects.items():
            out[f"bad_request_{status}"] = n
        return out


# request duration buckets (seconds), Prometheus' defaults
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Request durations: counts per bucket (not cumulative; the exporter sums them), the
    sum and the count. ``observe`` finds the bucket and makes three additions."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        i = 0  # bisect_left, as a loop: compiled, it is a few float comparisons, no calls
        for bound in self.bounds:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1


class Expiring(Protocol):
    """A connection the sweep ends once its ``deadline`` has passed (``on_timeout``):
    ``tls/gate.py``'s HTTPS connections before their handshake is done."""

    deadline: float

    def on_timeout(self) -> None: ...


class Session(Protocol):
    """An HTTP/2 client connection (``h2/front.py``'s H2Session): its streams are the
    request path's clients; the sweep and a drain reach them through this."""

    drain_at: float

    def tick(self, now: float) -> int: ...

    def is_idle(self) -> bool: ...

    def begin_drain(self, until: float) -> None: ...

    def close(self) -> None: ...


class Context:
    __slots__ = (
        "_ticker",
        "access",
        "client_body_timeout",
        "client_header_timeout",
        "client_idle_timeout",
        "client_send_timeout",
        "clients",
        "clock",
        "config",
        "date",
        "drain_grace",
        "draining",
        "dropped_fields",
        "first_heads",
        "forwarded",
        "generation",
        "handshaking",
        "header_kinds",
        "idempotency_keys",
        "inflight",
        "latency",
        "limits",
        "loop",
        "max_body_size",
        "max_header_bytes",
        "max_headers",
        "max_target",
        "name_kinds",
        "now",
        "on_ejected",
        "plain_forwarding",
        "retries_active",
        "retry_body_max",
        "rng",
        "scan_request",
        "scan_response",
        "sessions",
        "stats",
        "table",
        "tasks",
        "trust_cache",
        "trusted",
        "tunnel_idle",
        "tunnels",
        "upstream_response_timeout",
        "upstream_tls",
        "via",
        "x_forwarded",
        "x_forwarded_server",
    )

    def __init__(
        self,
        config: Config,
        table: RoutingTable,
        loop: asyncio.AbstractEventLoop,
        *,
        upstream_tls_: dict[str, ClientTls] | None = None,
    ):
        self.loop = loop
        self.table = table  # replaced whole, by one assignment, on every change
        self.tunnels: set[Tunnel] = set()  # upgraded connections (WebSocket and the like)
        self.clients: set[ClientConnection] = set()
        # HTTP/2 client connections (h2/front.py): their streams are the clients
        self.sessions: set[Session] = set()
        # HTTPS connections before their handshake is done (tls/gate.py): their deadline
        self.handshaking: set[Expiring] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = Stats()
        self.latency = Histogram()  # from the request's first byte to the response's last
        self.access: AccessLog | None = None
        self.date = DateCache()
        # the clock every deadline is counted on (the sweep reads it too); tests pass a fake
        self.clock: Callable[[], float] = time.monotonic
        self.now = self.clock()
        self.draining = False
        self.drain_grace = 0.0  # seconds: timeouts.drain_idle, set by begin_drain
        self._ticker: asyncio.TimerHandle | None = None
        self.rng = random.Random()
        # retry budget: retries in flight against requests in flight (sampled every tick)
        self.retries_active = 0
        self.inflight = 0
        # passive health ejected a backend (group, index): the server re-routes around it
        # (the Outliers that ejected it, so a report from a group that has since changed
        # membership is recognised as stale)
        self.on_ejected: Callable[[str, int, Outliers], None] = lambda group, index, o: None
        self.upstream_tls: dict[str, ClientTls] = {} if upstream_tls_ is None else upstream_tls_
        # the plain-head scanners (l7/scan.py: C when built); tests put in ones that answer
        # None, which leaves every head to the general path, to compare the two
        self.scan_request: Callable[
            [bytes, int, int, int, int, tuple[bytes, ...]], scan.RequestScan | None
        ] = scan.scan_request
        self.scan_response: Callable[[bytes], scan.ResponseScan | None] = scan.scan_response
        self.config = config  # what configure() compares a new config with
        # counts configure() calls: what a connection derived from the settings (a request
        # head it rebuilt, see l7/memo.py) is valid for one generation only
        self.generation = 0
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take the settings of ``config`` (at start, and on a reload: connections read them
        from here, so open ones follow the new values)."""
        old, self.config = self.config, config
        self.generation += 1
        # request heads remembered for the first read of new connections, by (listener,
        # peer, TLS fields): see client.ClientConnection.data_received (valid for this
        # generation only, so dropped here)
        self.first_heads: dict[tuple[str, bytes, bytes], RequestMemo] = {}
        t = config.timeouts
        self.client_header_timeout = t.client_header
        self.client_idle_timeout = t.client_idle
        self.client_body_timeout = t.client_body
        self.client_send_timeout = t.client_send
        self.limits = config.limits
        # the per-request limits as plain ints: compiled, reading a config attribute is a
        # lookup by name, reading these is a load
        self.max_headers: int = config.limits.max_headers
        self.max_header_bytes: int = config.limits.max_header_bytes
        self.max_target: int = config.limits.max_target
        self.max_body_size: int = config.limits.max_body_size
        self.trusted = tuple(ipaddress.ip_network(n) for n in config.proxy.trusted_proxies)
        # is_trusted's answers by peer address (parsing one costs more than the lookup)
        self.trust_cache: dict[str, bool] = {}
        self.forwarded = config.proxy.forwarded
        self.via = config.proxy.via
        self.tunnel_idle = t.tunnel_idle
        self.upstream_response_timeout = t.upstream_response
        self.x_forwarded = config.proxy.x_forwarded
        self.x_forwarded_server = config.proxy.x_forwarded_server
        # the forwarding fields are the usual X-Forwarded-For/-Proto/-Host and nothing else:
        # a request head is rebuilt by one join (ClientConnection._plain)
        self.plain_forwarding = self.x_forwarded and not self.forwarded and not self.via
        ups = config.upstreams.values()
        self.retry_body_max = max(
            (u.retry.max_body for u in ups if u.retry.attempts > 1), default=0
        )
        self.idempotency_keys = any(u.retry.idempotency_key for u in ups)
        # TLS to https:// backends, by group (the dict is shared with the server's health
        # probes): kept for a group whose tls settings stay, dropped when they changed (a
        # reload) and built again, lazily for groups that meet https backends later
        tls = self.upstream_tls
        for name in list(tls):
            ucfg, before = config.upstreams.get(name), old.upstreams.get(name)
            if (
                ucfg is None
                or before is None
                or ucfg.tls != before.tls
                or ucfg.protocol != before.protocol
            ):
                del tls[name]
        missing = {n: u for n, u in config.upstreams.items() if n not in tls}
        tls.update(upstream_tls(missing))
        # What the client protocol does with each request field. The headers that carry a
        # verified client-certificate subject are dropped from every client's input, on
        # every listener, so a backend can trust them.
        self.header_kinds = http.REQUEST_HEADER_KIND
        subject_fields = {
            lc.tls.client_subject_header.lower().encode("ascii")
            for lc in config.listeners
            if lc.tls is not None and lc.tls.client_subject_header
        }
        # (the same names for the head scanner, l7/scan.py)
        self.dropped_fields: tuple[bytes, ...] = tuple(sorted(subject_fields))
        if subject_fields:
            self.header_kinds = {
                **http.REQUEST_HEADER_KIND,
                **dict.fromkeys(subject_fields, http.HOP),
            }
        # the same, by field name as clients spell it ("Host", "User-Agent"), filled as names
        # come: one lookup per field instead of lowering each name first (see client.on_header)
        self.name_kinds: dict[bytes, int] = {}
        access = config.log.access
        if self.access is not None and (access is None or access != self.access.cfg):
            self.access.close()
            self.access = None
        if access is not None and self.access is None:
            self.access = AccessLog(access)

    def tls_for(self, group: str) -> ClientTls:
        """The TLS settings of ``group`` (built on first use for a group whose https
        backends were discovered at run time)."""
        tls = self.upstream_tls.get(group)
        if tls is None:
            tls = self.upstream_tls[group] = group_tls(self.config.upstreams[group])
        return tls

    def start(self) -> None:
        self._ticker = self.loop.call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.access is not None:
            self.access.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection-scoped coroutine (an upstream connect). Tracked, so shutdown can
        cancel it and its failure is logged instead of lost."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in connection task", exc_info=task.exception())

    def _tick(self) -> None:
        self.now = now = self.clock()
        self.date.refresh()
        if self.access is not None:
            self.access.flush()
        try:
            expired: list[ClientConnection | UpstreamConnection | Tunnel] = []
            min_rate = self.limits.min_body_rate
            stalled = [c for c in self.clients if c.send_deadline < now]
            for c in stalled:
                c.on_send_timeout()
            inflight = 0
            for c in self.clients:
                if c.queue:
                    inflight += 1
                if c.deadline < now:
                    expired.append(c)
                elif min_rate and c.reader.in_body and (cur := c.reader.cur) is not None:
                    # slow POST: after a grace period, the body must average min_rate bytes/s
                    elapsed = now - cur.body_started
                    if elapsed > BODY_RATE_GRACE and cur.body_bytes < min_rate * elapsed:
                        expired.append(c)
                elif c.queue:
                    busy = c.queue[0].conn  # only the head of the queue has one
                    if busy is not None and busy.deadline < now:
                        expired.append(busy)
            self.inflight = inflight + self._tick_sessions(now)
            expired += [t for t in self.tunnels if t.deadline < now]
            for conn in expired:
                conn.on_timeout()
            self._expire_handshakes(now)
            for group in self.table.groups.values():
                if group.admission is not None and group.admission.waiting:
                    group.admission.expire(now)
                for pool in group.pools:
                    if pool.idle or pool.mux:
                        pool.expire(now)
        finally:
            self._ticker = self.loop.call_later(TICK, self._tick)

    def _tick_sessions(self, now: float) -> int:
        """The HTTP/2 connections' deadlines (h2/front.py); their streams in flight."""
        inflight = 0
        for session in list(self.sessions):
            inflight += session.tick(now)
        return inflight

    def _expire_handshakes(self, now: float) -> None:
        """HTTPS connections whose handshake did not finish in time (tls/gate.py)."""
        for gate in [g for g in self.handshaking if g.deadline < now]:
            gate.on_timeout()

    def is_trusted(self, peer: str) -> bool:
        """Whether ``peer`` is a proxy whose X-Forwarded-* headers are believed."""
        if not self.trusted:
            return False
        known = self.trust_cache.get(peer)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            trusted = False
        else:
            trusted = any(ip in net for net in self.trusted)
        cache = self.trust_cache
        if len(cache) >= TRUST_CACHE_MAX:
            cache.clear()
        cache[peer] = trusted
        return trusted

    def begin_drain(self) -> None:
        """Stop keeping client connections alive, without losing a request on the wire.

        Every response from now on says ``Connection: close`` and its connection closes once
        it is written. A connection idle now may have a request already on its way that we
        have not read: closing it would lose that request (the client sees a reset), so it
        stays open for ``timeouts.drain_idle`` (at most ``timeouts.drain``); a request that
        comes meanwhile is served, with ``Connection: close``. ``close_idle_clients`` closes
        those still idle after that (so Envoy drains)."""
        self.draining = True
        t = self.config.timeouts
        self.drain_grace = min(t.drain_idle, t.drain)
        until = self.clock() + self.drain_grace
        for c in self.clients:
            if c.is_idle():
                c.drain_at = until
        for session in list(self.sessions):
            session.begin_drain(until)

    def close_idle_clients(self, now: float) -> int:
        """For draining: close every client connection with nothing in flight whose grace
        (see ``begin_drain``) has ended by ``now`` (``clock()``)."""
        n = 0
        for c in list(self.clients):
            if c.drain_at <= now and c.is_idle():
                c.close()
                n += 1
        for session in list(self.sessions):
            if session.drain_at <= now and session.is_idle():
                session.close()
                n += 1
        return n

    def statistics(self) -> dict[str, Any]:
        return {
            "stats": self.stats.as_dict(),
            "clients": len(self.clients),
            "http2_connections": len(self.sessions),
            "tunnels": len(self.tunnels),
            "pools": {
                name: [p.statistics() for p in group.pools]
                for name, group in self.table.groups.items()
            },
        }

    def __repr__(self) -> str:
        return f"Context(clients={len(self.clients)}, draining={self.draining})"
