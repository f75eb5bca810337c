"""The client side of the HTTP/1.1 proxy: one ``ClientConnection`` per accepted socket.

Theory of operation
-------------------
The connection's ``RequestReader`` (l7/reader.py) turns the client's bytes into requests: a
remembered head, one scan of a plain head (l7/scan.py), or httptools (llhttp) with callbacks
for everything else. Each request becomes an ``Exchange`` appended to ``queue``; requests
that break the rules are refused here (``reject``). Only ``queue[0]`` is active: it is routed,
given a pooled (or new) upstream connection, and its head and body are written there as they
arrive. Later pipelined requests wait in the queue with their body bytes held (reading pauses
past a bound), so responses leave in request order (RFC 9112 §9.3.2).

The request head is rebuilt, never copied (docs/http-rules.md, in reader.py): the request
line is re-emitted as HTTP/1.1, hop-by-hop fields and every field named by ``Connection`` are
dropped (RFC 9110 §7.6.1) *before* our X-Forwarded-* are added, and framing is re-declared by
us: the validated Content-Length, or ``Transfer-Encoding: chunked`` with the body re-chunked
(extensions and trailers dropped; RFC 9112 §7.1).

Framing doubts are never forwarded: Content-Length and Transfer-Encoding together, a
Content-Length that is not ``1*DIGIT`` or differs between copies, a transfer coding other
than a lone ``chunked``, TE in HTTP/1.0, a missing or repeated Host (RFC 9112 §3.2, §6.1,
§6.3) each get 400 (501 for an unknown coding) and the connection is closed; bytes after a
rejected request are never parsed.

An exchange ends when the request has been read *and* the response written; then the next
queued request starts, or the connection closes when either side asked for it. Choosing a
backend beyond the common case, waiting for a slot, connecting and what a failed attempt
leads to are in l7/attempts.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

from poise import failures
from poise.balancing import keys
from poise.h2.upstream import mux_dispatch
from poise.l7 import attempts, http
from poise.l7.reader import (
    CLOSED,
    HALF_CLOSED,
    PAUSE_QUEUE,
    QUEUE_BODY_LIMIT,
    READING,
    REFUSED,
    UPGRADING,
    RequestReader,
)
from poise.l7.request import (
    Exchange,
    abandon,
    connection_fields,
    field_list,
    settle,
)
from poise.l7.response import send_out
from poise.l7.tunnel import Tunnel
from poise.l7.upstream import UpstreamConnection
from poise.tls.transport import TlsTransport

if TYPE_CHECKING:
    from poise.failures import AttemptFailure
    from poise.l7.context import Context
    from poise.models import Backend
    from poise.routing import Group
    from poise.tls.contexts import ListenerTls
    from poise.upstream.pool import Pool

log = logging.getLogger("poise.proxy")

LINGER: Final = 2.0  # seconds to drain a client after an error response before closing
_INF: Final = float("inf")
_PAUSE_UPSTREAM: Final = 1  # client reading paused: the upstream cannot take more request body


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "close_after",
        "closed",
        "ctx",
        "deadline",
        "drain_at",
        "forwarded",
        "held",
        "last_write",
        "listener",
        "paused",
        "peer",
        "queue",
        "reader",
        "send_deadline",
        "tls",
        "tls_fields",
        "transport",
        "trusted",
        "write_paused",
    )

    def __init__(self, ctx: Context, listener: str, tls: ListenerTls | None = None) -> None:
        self.ctx = ctx
        self.listener = listener
        self.tls = tls  # an HTTPS listener's TLS (the client-certificate subject header)
        self.tls_fields = b""  # that header's line, when the client's certificate was verified
        self.transport: asyncio.Transport | None = None
        # a list, not a deque: it holds one request but for pipelining clients, and compiled,
        # list operations are inline while a deque's are method calls
        self.queue: list[Exchange] = []
        self.reader = RequestReader(self, ctx)  # the client's bytes -> requests on the queue
        self.deadline = _INF
        self.drain_at = _INF  # draining: when this connection, if idle, is closed (Context)
        self.closed = False
        self.close_after = False
        self.paused = 0
        self.write_paused = False
        self.peer = b""
        self.forwarded = b""
        self.trusted = False
        self.send_deadline = _INF
        self.held: list[bytes] = []  # client bytes after it, not parsed until that answer
        self.last_write = False  # the transport ends with write_last (the hub's Conn)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.stats.connections_accepted += 1
        ctx.clients.add(self)
        self.peer, self.trusted, self.tls_fields, self.forwarded = connection_fields(
            ctx, transport, self.tls
        )
        transport.set_write_buffer_limits(high=256 * 1024)
        self.last_write = hasattr(transport, "write_last")
        self.deadline = ctx.clock() + ctx.client_header_timeout
        if ctx.draining:
            # accepted as the drain began: its client has sent, or is sending, a request
            # that is served (with Connection: close) if it comes within the grace
            self.drain_at = ctx.clock() + ctx.drain_grace
        elif len(ctx.clients) > ctx.limits.max_connections:
            # Refuse politely rather than let accept() pressure hurt everyone in flight.
            refused = failures.CONNECTIONS_REFUSED
            ctx.stats.count(refused.counter)
            transport.write(
                http.error_response(refused.status, refused.message, ctx.date.value, close=True)
            )
            self._linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.clients.discard(self)
        for ex in self.queue:
            abandon(ex, self.ctx)
        self.queue.clear()
        self.reader.state = CLOSED
        self.reader.parser = self.reader.client = None  # (the two would keep each other alive)

    def eof_received(self) -> bool | None:
        """The client shut down its sending side. Requests already read still get their
        responses (a half-close is not an abort); then the connection closes."""
        if self.reader.state == READING and self.queue and self.reader.cur is None:
            self.close_after = True
            self.reader.state = HALF_CLOSED
            return True
        # Idle, or in the middle of a request that can now never be completed: an abort.
        # Returning None closes the transport; connection_lost abandons any upstream.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        # a client that takes nothing for timeouts.client_send is cut off (slow read)
        self.send_deadline = self.ctx.clock() + self.ctx.client_send_timeout
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None:
                conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = _INF
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None:
                conn.resume_reading()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader.state != READING:
            if reader.state == UPGRADING:  # held until the backend answers (see finish)
                self.held.append(data)
                if sum(map(len, self.held)) > QUEUE_BODY_LIMIT:
                    self.pause(PAUSE_QUEUE)
            return  # (closing, lingering after an error, or half-closed: dropped)
        reader.feed(data)
        queue = self.queue
        if queue and not queue[0].started and not self.closed:
            self.start(queue[0])

    # -- parser callbacks ------------------------------------------------------------------

    # other HOP fields: dropped

    # -- exchange lifecycle ----------------------------------------------------------------

    def start(self, ex: Exchange) -> None:
        ex.started = True
        if ex.error is not None:
            self._send_error(ex, ex.error, close=True)
            return
        table = self.ctx.table
        only = table.catch_all.get(self.listener)
        if only is not None:
            group: Group | None = table.groups[only]
        else:
            qpos = ex.target.find(b"?")
            path = ex.target if qpos < 0 else ex.target[:qpos]
            group = table.route(self.listener, http.host_without_port(ex.host), path)
        if group is None:
            attempts.give(self, ex, failures.NO_ROUTE)
            return
        ex.group = group
        self.dispatch(ex, group)

    # Each branch is a way a request reaches its backend (the common case inlined: a call
    # per branch would run per request on the compiled hot path; issue #19 allows it).
    def dispatch(self, ex: Exchange, group: Group) -> None:  # noqa: PLR0912
        """Send ``ex`` to the next usable backend it has not tried yet. ``group`` is read from
        the current routing table (health may have changed since the first attempt)."""
        up = group.up
        tried = ex.tried
        key = None
        if group.key is not None:
            key = keys.extract(group.key, ex.client_ip or self.peer, ex.target, field_list(ex))
            if group.sticky is not None:
                ex.sticky = group.sticky
                ex.sticky_key = key
        if group.special:
            chosen = attempts.choose(self, ex, group, key)
            if chosen is None:
                return
            backend = chosen
        else:
            # the first candidate that is up and not tried (Picker.pick: without building
            # the candidate order when, as usual, the first one will do)
            picked = None
            if tried and group.healthy is not None:
                # a retry in panic mode: a backend usable in its own right first
                picked = group.picker.pick(key, group.healthy, tried)
            if picked is None:
                picked = group.picker.pick(key, up, tried)
            if picked is None:
                attempts.none_left(self, ex)
                return
            backend = picked
        ex.tried = (*tried, backend)
        ex.backend = backend
        ex.group = group  # the table this backend (its index, pool, load) comes from
        load = group.load
        if load is not None:
            load.active[backend.index] += 1
            ex.load = load
            if load.latency:
                ex.sent_at = time.monotonic()
            adm = group.admission
            if adm is not None:
                adm.active += 1
                ex.admission = adm
        pool: Pool[UpstreamConnection] = group.pools[backend.index]
        if group.mux:  # HTTP/2 to the backends: a stream on a multiplexed connection
            mux_dispatch(self, ex, backend, pool)
            return
        idle = pool.idle
        conn = idle.pop() if idle else None  # Pool.take, inlined
        while conn is not None and conn.closed:
            conn = idle.pop() if idle else None
        if conn is None:
            self.ctx.spawn(attempts.connect(self, ex, backend))
            return
        pool.reuses += 1
        # attach, inlined for the common case (a pooled connection, no body held back)
        ex.conn = conn
        if ex.pending:
            self.attach(ex, conn)
            return
        conn.start(ex, self, None)
        if self.write_paused:
            conn.pause_reading()

    def mux_again(self, ex: Exchange, backend: Backend) -> None:
        """``ex`` goes to ``backend`` again on another HTTP/2 stream (h2/upstream.py): its
        stream was refused, so nothing was processed."""
        assert ex.group is not None
        mux_dispatch(self, ex, backend, ex.group.pools[backend.index])

    def attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.conn = conn
        pending = ex.pending
        ex.pending = ()
        if ex.pending_bytes:
            ex.pending_bytes = 0
            self._resume(PAUSE_QUEUE)
        conn.start(ex, self, pending)
        if self.write_paused:
            conn.pause_reading()

    # -- what the upstream protocol reports (the decisions are in attempts.py) -------------

    def retry(self, ex: Exchange) -> None:
        """Send ``ex`` again, to another backend (``attempts.retry``): the response was a
        status the group retries (``verdicts.judge_status`` said so)."""
        attempts.retry(self, ex)

    def upstream_failed(self, ex: Exchange, failure: AttemptFailure, reusable_retry: bool) -> None:
        """The upstream connection of ``ex`` failed (``attempts.upstream_failed``)."""
        attempts.upstream_failed(self, ex, failure, reusable_retry)

    def forward(self, out: list[bytes | memoryview]) -> None:
        """Response bytes from the backend, all of one read: one write (unless closed)."""
        if not self.closed:
            assert self.transport is not None
            send_out(self.transport, out)

    def forward_last(self, out: list[bytes | memoryview]) -> None:
        """The end of the last response on this connection (it closes after it): over TLS
        the close_notify goes in the same write (one send, one wake-up of the client less)."""
        if not self.closed:
            transport = self.transport
            assert transport is not None
            if isinstance(transport, TlsTransport):
                transport.write_last(out)
            elif self.last_write:
                # the hub's Conn (wire/_hub.c) writes them and closes: the FIN goes in the
                # same segment as the response's end (one packet less per connection)
                cast(Any, transport).write_last(out)
            else:
                send_out(transport, out)

    def response_complete(self, ex: Exchange) -> None:
        """The whole response of ``ex`` has been written to the transport."""
        ex.response_done = True
        ex.conn = None
        load = ex.load
        if load is not None:
            backend = ex.backend
            if load.latency or ex.admission is not None or backend is None:
                settle(ex, ok=ex.status < 500 and ex.status != 429)
            else:  # settle, inlined for the usual load-aware case (p2c, least_conn): a count
                ex.load = None
                active = load.active
                if active[backend.index] > 0:
                    active[backend.index] -= 1
        ctx = self.ctx
        if ex.retrying:
            ex.retrying = False
            ctx.retries_active -= 1
        ctx.stats.responses += 1
        t0 = ex.t0
        now = ctx.clock()  # the duration, and when the connection becomes idle
        if t0:
            ex.t0 = 0.0  # counted once
            ctx.latency.observe(now - t0)
            if ctx.access is not None:
                ctx.access.record(ex, self.peer, now - t0, "ok")
        if ex.request_done:
            # finish, inlined for the common case: nothing queued behind, keep-alive
            queue = self.queue
            if (
                len(queue) == 1
                and ex.keep_alive
                and self.reader.cur is None
                and not self.close_after
                and not ctx.draining
                and self.reader.state != UPGRADING
            ):
                queue.clear()
                self.deadline = now + ctx.client_idle_timeout
            else:
                self.finish(ex)
        else:
            # The backend answered before the request body ended (an early 413, say). The
            # rest of the body cannot go anywhere useful: end the connection after the write.
            self.close()

    def start_tunnel(self, conn: UpstreamConnection, from_backend: bytes) -> None:
        """The backend answered the upgrade with 101: from now on both connections are one
        byte tunnel. Called by the upstream connection after it wrote the 101 head."""
        ctx = self.ctx
        for ex in self.queue:
            if ex.load is not None:
                settle(ex, ok=True)
            if ex.retrying:
                ex.retrying = False
                ctx.retries_active -= 1
        self.queue.clear()
        self.closed = True  # as an HTTP connection; the transport lives on in the tunnel
        ctx.clients.discard(self)
        conn.detach()
        self.reader.state = CLOSED
        self.reader.parser = self.reader.client = None  # the transport belongs to the tunnel
        held, self.held = self.held, []
        assert self.transport is not None and conn.transport is not None
        tunnel = Tunnel(ctx, self.transport, conn.transport, ctx.tunnel_idle)
        tunnel.send(from_backend, b"".join(held))
        if ctx.draining:
            tunnel.close()

    def finish(self, ex: Exchange) -> None:
        t0 = ex.t0
        if t0:  # an exchange that did not end in response_complete (an error, say)
            ex.t0 = 0.0  # counted once
            ctx = self.ctx
            elapsed = ctx.clock() - t0
            ctx.latency.observe(elapsed)
            if ctx.access is not None:
                ctx.access.record(ex, self.peer, elapsed, "local" if ex.local else "ok")
        queue = self.queue
        if queue and queue[0] is ex:
            del queue[0]
        if not ex.keep_alive or (self.close_after and not queue):
            self.close()  # (after a half-close: once every request read has its response)
            return
        if self.ctx.draining:
            # A response without Connection: close (its head left before the drain began):
            # the client may send its next request at once, so the connection stays open for
            # the grace, like one idle when the drain began (Context.begin_drain).
            self.drain_at = self.ctx.clock() + self.ctx.drain_grace
        if self.reader.state == UPGRADING:
            # The backend declined to switch protocols: back to HTTP, starting with what the
            # client sent after its upgrade request.
            self.reader.restart()
            held, self.held = self.held, []
            self._resume(PAUSE_QUEUE)
            self.deadline = self.ctx.clock() + self.ctx.client_idle_timeout
            for data in held:
                self.data_received(data)
            return
        if queue:
            self._resume(PAUSE_QUEUE)
            self.start(queue[0])
        elif self.reader.cur is None:
            self.deadline = self.ctx.clock() + self.ctx.client_idle_timeout

    def answer(self, ex: Exchange, status: int, message: str) -> None:
        """Answer ``ex`` ourselves (an error): keep-alive only when its request is complete."""
        close = not ex.request_done or not ex.keep_alive or self.ctx.draining
        self._send_error(
            ex, http.error_response(status, message, self.ctx.date.value, close=close), close=close
        )

    def _send_error(self, ex: Exchange, response: bytes, *, close: bool) -> None:
        ex.response_done = True
        ex.response_started = True
        ex.local = True
        ex.status = int(response[9:12])  # "HTTP/1.1 503 ...": what the client got
        if ex.retrying:
            ex.retrying = False
            self.ctx.retries_active -= 1
        transport = self.transport
        assert transport is not None
        transport.write(response)
        self.ctx.stats.responses += 1
        if close:
            self._linger()
        elif ex.request_done:
            self.finish(ex)

    def reject(self, status: int, message: str) -> None:
        """A request broke the rules: answer in order, then close; parse nothing more."""
        self.reader.state = REFUSED
        stats = self.ctx.stats
        stats.bad_requests += 1
        stats.rejects[status] = stats.rejects.get(status, 0) + 1
        self.pause(PAUSE_QUEUE)
        cur = self.reader.cur
        self.reader.cur = None
        if cur is not None and cur in self.queue and cur.started:
            # Its head was fine but its body broke framing mid-way: the upstream has part of
            # a request, so that connection is abandoned.
            abandon(cur, self.ctx)
            if cur.response_started:
                self.close()
                return
            self.queue.remove(cur)
        elif cur is not None and cur in self.queue:
            self.queue.remove(cur)
        ex = Exchange()
        ex.request_done = True
        ex.keep_alive = False
        ex.error = http.error_response(status, message, self.ctx.date.value, close=True)
        self.queue.append(ex)
        if not self.queue[0].started:
            self.start(self.queue[0])

    # -- flow control, timeouts, closing ---------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.pause(_PAUSE_UPSTREAM)
        else:
            self._resume(_PAUSE_UPSTREAM)

    def is_idle(self) -> bool:
        return not self.queue and self.reader.cur is None

    def on_send_timeout(self) -> None:
        """The client stopped reading its response: nothing more can reach it."""
        self.send_deadline = _INF
        self.ctx.stats.client_timeouts += 1
        for ex in self.queue:
            abandon(ex, self.ctx)
        if self.transport is not None and not self.closed:
            self.closed = True
            self.reader.state = CLOSED
            self.ctx.clients.discard(self)
            self.transport.abort()  # close() would wait for a flush that never comes

    def on_timeout(self) -> None:
        self.deadline = _INF
        if self.reader.state != READING:  # lingering after an error (or not reading): time is up
            self.close()
            return
        self.ctx.stats.client_timeouts += 1
        answer = False
        if self.reader.in_body and self.queue and not self.queue[-1].response_started:
            # A request body that stopped arriving (slow POST): answer if nothing was sent.
            abandon(self.queue[-1], self.ctx)
            answer = len(self.queue) == 1
        elif self.reader.cur is not None and not self.queue:
            answer = True  # a request head that did not arrive in time (slowloris)
        if not answer:
            self.close()
            return
        assert self.transport is not None
        late = failures.CLIENT_TIMEOUT
        self.ctx.stats.count(late.counter)
        self.transport.write(
            http.error_response(late.status, late.message, self.ctx.date.value, close=True)
        )
        self.queue.clear()
        self._linger()  # a client still sending (a trickle) would get a reset over the 408

    def _linger(self) -> None:
        """Close after an error without resetting the client: send FIN once the response is
        flushed and drop whatever the client still sends for a moment, so its kernel does not
        discard our response on an RST (nginx's lingering close)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        reader = self.reader  # nothing more is read as a request, nor timed as one
        reader.state = REFUSED
        reader.parser = reader.cur = None
        reader.in_body = False
        self._resume(self.paused)
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the client is already gone (ENOTCONN): nothing to linger for
                self.close()
                return
            self.deadline = self.ctx.clock() + LINGER
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.reader.state = CLOSED
            self.closed = True
            self.ctx.clients.discard(self)
            self.transport.close()

    def __repr__(self) -> str:
        return f"ClientConnection({self.peer.decode()}, queue={len(self.queue)})"
