"""HTTP/2 towards backends (upstream ``protocol`` h2 or grpc): multiplexed connections.

Theory of operation
-------------------
A backend's pool holds its HTTP/2 connections (``Pool.mux``), each an ``H2Backend``
carrying up to ``MAX_STREAMS`` requests at once (fewer if the backend's SETTINGS say so).
Dispatch (``ClientConnection.dispatch``) hands a request for such a group to
``mux_dispatch``: the first connection with room takes it as a new stream, or a new
connection is opened (h2c to http:// backends; TLS with ALPN ``h2`` to https:// ones) and
the requests that came meanwhile wait for it.

Each request stream is a ``MuxStream``, which stands where the request path expects an
upstream connection (``Exchange.conn``): it subclasses ``UpstreamConnection`` and takes the
same calls (start, send, request_sent, pause/resume reading, abandon, the sweep's deadline
and on_timeout), so routing, balancing, retries, passive health, limits and timeouts are the
HTTP/1.1 ones. The request is what the HTTP/1.1 path built (``Exchange.head``, with the
forwarding fields), turned into a header list; a body that was re-chunked for HTTP/1.1 is
unchunked again (the pieces always come as size line, data, CRLF).

The response goes to the client as it is for HTTP/2 clients (``H2Stream.relay_*``: the
header list, DATA, and the trailers, which gRPC needs), and as an HTTP/1.1 response for
HTTP/1.1 clients (chunked when the backend gave no length; trailers are not passed on).

Failures: a stream the backend refused (REFUSED_STREAM) or did not take (above its GOAWAY's
last stream id) was not processed, and goes again on another connection like a stale
keep-alive connection's request; a reset or lost connection before the response head is
``RESET``, after it ``BROKEN`` (the client's stream is reset then); the response timeout is
the HTTP/1.1 one (with ``grpc-timeout`` as the request's deadline for gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from poise import failures
from poise.grpc import format_timeout
from poise.h2.engine import (
    CANCEL,
    DATA,
    GOAWAY,
    REFUSED_STREAM,
    RESET,
    RESPONSE,
    TRAILERS,
    WINDOW,
    EngineError,
    NativeEngine,
    PureEngine,
    Settings,
    default_engine,
    make,
)
from poise.l7 import http
from poise.l7.request import settle
from poise.l7.response import head_tail
from poise.l7.upstream import UpstreamConnection
from poise.l7.verdicts import judge_status

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection
    from poise.l7.context import Context
    from poise.l7.request import Exchange
    from poise.models import Backend
    from poise.upstream.pool import Pool

log = logging.getLogger("poise.proxy")

MAX_STREAMS: Final = 100  # requests at once on one backend connection, at most
REFUSED_TRIES: Final = 3  # a request refused unprocessed goes again this often, at most
HIGH: Final = 256 * 1024  # request body bytes queued towards a backend: pause the client
BACKEND: Final = Settings(initial_window_size=256 * 1024, connection_window=4 * 1024 * 1024)
CONNECTING: Final = 0
OPEN: Final = 1
CLOSED: Final = 2
_INF: Final = float("inf")
_DROP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
     b"te", b"host"}
)  # fmt: skip


def request_headers(
    ex: Exchange, scheme: bytes, grpc: bool, left: float | None = None
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list of the HTTP/1.1 request head poise built for ``ex``; with
    ``left`` (seconds), its ``grpc-timeout`` says the time left, not the time the client
    gave (the deadline does not move later as the call goes through poise)."""
    lines = ex.head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0]
    out: list[tuple[bytes, bytes]] = [(b":method", method), (b":scheme", scheme),
                                      (b":authority", b""), (b":path", target)]  # fmt: skip
    authority = b""
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        low = name.lower()
        value = value.strip(b" \t")
        if low == b"host":
            authority = value
        elif low == b"grpc-timeout" and left is not None:
            out.append((low, format_timeout(left).encode("ascii")))
        elif low not in _DROP:
            out.append((low, value))
    out[2] = (b":authority", authority)
    if grpc:
        out.append((b"te", b"trailers"))  # gRPC servers require it (HTTP/2 allows only this)
    return out


def unchunk(pieces: tuple[bytes, ...] | list[bytes]) -> tuple[bytes, bool]:
    """Body pieces as poise chunks them (size line, data, CRLF; ``0\\r\\n\\r\\n`` at the
    end): the data, and whether the end was among them."""
    data: list[bytes] = []
    i = 0
    n = len(pieces)
    end = False
    while i < n:
        p = pieces[i]
        if p == b"0\r\n\r\n":
            end = True
            i += 1
            continue
        data.append(pieces[i + 1])
        i += 3
    return b"".join(data), end


def mux_dispatch(client: ClientConnection, ex: Exchange, backend: Backend, pool: Pool[Any]) -> None:
    """Give ``ex`` a stream to ``backend``: on a connection with room, or a new one."""
    for m in pool.mux:
        if m.room():
            m.take(client, ex)
            return
    group = ex.group
    assert group is not None
    m = H2Backend(client.ctx, pool, backend, group.name, grpc=group.config.protocol == "grpc")
    pool.mux.append(m)
    m.take(client, ex)
    client.ctx.spawn(m.connect())


class MuxStream(UpstreamConnection):
    """One request on an ``H2Backend`` (see the module docstring)."""

    __slots__ = ("chunked", "ended", "mux", "owed", "sid", "status")

    def __init__(self, mux: H2Backend, ex: Exchange, client: ClientConnection) -> None:
        # UpstreamConnection.__init__ is not called: the connection is the H2Backend's; these
        # are the fields its inherited methods (the deadline, _arm) and the sweep read
        ctx = mux.ctx
        group = ex.group
        assert group is not None
        self.ctx = ctx
        self.pool = mux.pool
        self.backend = mux.backend
        self.timeout = group.config.retry.per_try_timeout or ctx.upstream_response_timeout
        self.total = group.retry_timeout or ctx.upstream_response_timeout
        self.transport = None
        self.ex = ex
        self.client = client
        self.deadline = _INF
        self.idle_since = 0.0
        self.closed = False
        self.reused = False
        self.out = []
        self.mux = mux
        self.sid = 0
        self.status = 0  # the final status, once the head came
        self.ended = False  # the request's END_STREAM was sent
        self.owed = 0  # response bytes not yet acknowledged (the client is not reading)
        self.chunked = False  # the response goes chunked to an HTTP/1.1 client

    # -- the request ---------------------------------------------------------------------

    def start(self, ex: Exchange, client: ClientConnection, body: tuple[bytes, ...] | None) -> None:
        mux = self.mux
        left = ex.until - self.ctx.clock() if ex.grpc and ex.until else None
        headers = request_headers(ex, mux.scheme, mux.grpc, left)
        data = b""
        end = False
        if body:
            if ex.chunked:
                data, end = unchunk(body)
            else:
                data = b"".join(body)
                end = ex.request_done
        elif ex.request_done:
            end = True
        try:
            self.sid = mux.engine.request(headers, not ex.has_body and ex.request_done)
        except Exception:
            mux.goaway = 0
            self.closed = True
            self.ex = self.client = None
            ex.conn = None
            ex.pending = body or ()
            client.mux_again(ex, self.backend)
            return
        if not ex.has_body and ex.request_done:
            self.ended = True
        else:
            if data or end:
                mux.engine.data(self.sid, data, end)
            self.ended = end
        mux.streams[self.sid] = self
        mux.kick()
        if ex.request_done:
            self.request_sent()
        else:
            self.deadline = _INF

    def send(self, pieces: Any) -> None:
        if self.closed or self.ended:
            return
        ex = self.ex
        if ex is not None and ex.chunked:
            data, end = unchunk(pieces)
        else:
            data, end = b"".join(pieces), False
        mux = self.mux
        if data or end:
            mux.engine.data(self.sid, data, end)
            self.ended = end
            mux.kick()
        if mux.engine.queued(self.sid) > HIGH and self.client is not None:
            mux.blocked.add(self)
            self.client.upstream_write_paused(True)

    def request_sent(self) -> None:
        ex = self.ex
        if ex is None or self.closed:
            return
        if not self.ended:
            self.ended = True
            self.mux.engine.data(self.sid, b"", True)
            self.mux.kick()
        self._arm(ex)

    # -- the response (H2Backend calls these) ---------------------------------------------

    def on_response(self, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        status = 0
        for name, value in headers:
            if name == b":status":
                status = int(value)
                break
        if status < 200:
            return  # 1xx: not relayed
        self.status = ex.status = status
        self.pool.responses[status // 100 if status < 600 else 5] += 1
        group = ex.group
        assert group is not None
        judged = status >= 500 or (group.outliers is not None and group.outliers.any_streak)
        if judged and judge_status(
            self.ctx, ex, self.backend, status, b"", forwarded=False, client_closed=client.closed
        ):
            self._drop(CANCEL)
            if ex.load is not None:
                settle(ex, ok=False)
            client.retry(ex)
            return
        ex.response_started = True
        if ex.unframed:
            cast(Any, client).relay_head(headers)
        else:
            client.forward([self._h1_head(ex, client, status, headers, end)])
        if end:
            self._done(ex, client)
        elif not client.write_paused:
            self.deadline = self.ctx.clock() + self.timeout

    def _h1_head(
        self,
        ex: Exchange,
        client: ClientConnection,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        end: bool,
    ) -> bytes:
        """An HTTP/1.1 response head for an HTTP/1.1 client."""
        parts = [http.status_line(status).rstrip(b"\r\n")]
        has_length = False
        for name, value in headers:
            if name[:1] == b":":
                continue
            if name == b"content-length":
                has_length = True
            parts.append(b"\r\n" + name + b": " + value)
        no_body = ex.is_head or status in (204, 304) or end
        tail = b""
        if not has_length and not no_body:
            if ex.http10:
                ex.keep_alive = False
            else:
                tail = b"\r\nTransfer-Encoding: chunked"
                self.chunked = True
        elif not has_length and end and not ex.is_head and status not in (204, 304):
            tail = b"\r\nContent-Length: 0"
        return b"".join(parts) + head_tail(self.ctx, self.backend, ex, client, tail)

    def on_data(self, data: bytes, end: bool) -> None:
        ex, client = self.ex, self.client
        n = len(data)
        if ex is None or client is None:
            self.mux.engine.consumed(self.sid, n)
            return
        if n:
            if ex.unframed:
                cast(Any, client).relay_data(data)
            elif self.chunked:
                client.forward([b"%x\r\n" % n, data, b"\r\n"])
            else:
                client.forward([data])
            if client.write_paused:
                self.owed += n
            else:
                self.mux.engine.consumed(self.sid, n)
                self.mux.kick()
        if end:
            self._done(ex, client)
        elif not client.write_paused:
            self.deadline = self.ctx.clock() + self.timeout

    def on_trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        if ex.unframed:
            cast(Any, client).relay_trailers(headers)
        self._done(ex, client)

    def _done(self, ex: Exchange, client: ClientConnection) -> None:
        if self.chunked:
            client.forward([b"0\r\n\r\n"])
        self._let_go()
        if not client.closed:
            client.response_complete(ex)

    def on_reset(self, code: int) -> None:
        """The backend reset the stream (or the connection ended under it: ``code`` -1;
        or it was above the backend's GOAWAY: REFUSED_STREAM)."""
        ex, client = self.ex, self.client
        self._let_go()
        if ex is None or client is None:
            return
        if (
            code == REFUSED_STREAM
            and not ex.response_started
            and ex.stale_retries < REFUSED_TRIES
            and (not ex.has_body or (ex.request_done and ex.kept is not None))
            and not client.closed
        ):
            # Not processed (refused, or above the backend's GOAWAY): it goes again on
            # another stream whatever its method, with its body if poise kept it whole
            # (retry.max_body), as a stale keep-alive connection's request does.
            ex.stale_retries += 1
            ex.conn = None
            ex.pending = tuple(ex.kept) if ex.kept else ()
            client.mux_again(ex, self.backend)
            return
        client.upstream_failed(ex, failures.BROKEN if self.status else failures.RESET, False)

    # -- what the request path calls ------------------------------------------------------

    def pause_reading(self) -> None:
        """The client is not keeping up: the backend's window stays shut meanwhile."""
        self.deadline = _INF

    def resume_reading(self) -> None:
        if self.owed and not self.closed:
            owed, self.owed = self.owed, 0
            self.mux.engine.consumed(self.sid, owed)
            self.mux.kick()
        if self.ex is not None:
            self.deadline = self.ctx.clock() + self.timeout

    def usable(self) -> bool:
        return False  # (never pooled: a stream serves one request)

    def detach(self) -> None:
        self._drop(CANCEL)

    def abandon(self) -> None:
        self._drop(CANCEL)

    def close(self) -> None:
        self._drop(CANCEL)

    def on_timeout(self) -> None:
        ex, client = self.ex, self.client
        self.deadline = _INF
        if ex is None or client is None:
            return
        self._drop(CANCEL)
        client.upstream_failed(ex, failures.TIMEOUT, False)

    def _drop(self, code: int) -> None:
        """Reset the stream (the request is not wanted any more) and let it go."""
        if not self.closed:
            self.mux.engine.reset(self.sid, code)
            self.mux.kick()
        self._let_go()

    def _let_go(self) -> None:
        self.ex = self.client = None
        self.deadline = _INF
        if not self.closed:
            self.closed = True
            self.mux.stream_done(self)

    def __repr__(self) -> str:
        return f"MuxStream({self.backend.authority}, {self.sid})"


class H2Backend:
    """One HTTP/2 connection to a backend (an asyncio protocol)."""

    __slots__ = (
        "backend",
        "blocked",
        "ctx",
        "engine",
        "goaway",
        "group",
        "grpc",
        "idle_since",
        "kicked",
        "pool",
        "ready",
        "scheme",
        "state",
        "streams",
        "transport",
        "waiting",
    )  # fmt: skip

    def __init__(
        self, ctx: Context, pool: Pool[Any], backend: Backend, group: str, *, grpc: bool
    ) -> None:
        self.ctx = ctx
        self.pool = pool
        self.backend = backend
        self.group = group
        self.grpc = grpc
        self.scheme = b"https" if backend.scheme == "https" else b"http"
        kind = default_engine() or "pure"
        self.engine: NativeEngine | PureEngine = make(kind, BACKEND, client=True)
        self.state = CONNECTING
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, MuxStream] = {}
        self.waiting: list[tuple[ClientConnection, Exchange]] = []  # while connecting
        self.blocked: set[MuxStream] = set()  # streams whose request body waits for a window
        self.goaway = 2**31  # no stream above this id may be opened (the backend's GOAWAY)
        self.kicked = False
        self.idle_since = 0.0
        self.ready = asyncio.Event()  # the backend's first SETTINGS came

    def limit(self) -> int:
        """Streams this connection may carry at once: MAX_STREAMS, or fewer once the
        backend's SETTINGS say so (until they came: MAX_STREAMS requests wait for them)."""
        if self.ready.is_set():
            return min(MAX_STREAMS, self.engine.peer_streams())
        return MAX_STREAMS

    def room(self) -> bool:
        if self.state == CLOSED or self.goaway < 2**31:
            return False
        return len(self.streams) + len(self.waiting) < self.limit()

    def take(self, client: ClientConnection, ex: Exchange) -> None:
        if self.ready.is_set() and len(self.streams) < self.limit():
            self._start(client, ex)
        else:
            self.waiting.append((client, ex))

    def _start(self, client: ClientConnection, ex: Exchange) -> None:
        if client.closed or not client.queue or client.queue[0] is not ex:
            return  # (the client went away meanwhile)
        self.idle_since = 0.0
        self.pool.reuses += 1
        client.attach(ex, MuxStream(self, ex, client))

    def _start_waiting(self) -> None:
        """Requests that wait for this connection, as far as its limit allows (the rest
        wait for streams to end, as nghttp2 queues them)."""
        waiting = self.waiting
        while waiting and len(self.streams) < self.limit() and self.state == OPEN:
            client, ex = waiting.pop(0)
            self._start(client, ex)

    async def connect(self) -> None:
        from poise.l7 import attempts

        ctx = self.ctx
        backend = self.backend
        t = ctx.tls_for(self.group) if backend.scheme == "https" else None
        timeout = ctx.config.timeouts.upstream_connect
        try:
            async with asyncio.timeout(timeout):
                await ctx.loop.create_connection(
                    lambda: cast(asyncio.Protocol, self),
                    backend.host,
                    backend.port,
                    ssl=t.context if t is not None else None,
                    server_hostname=t.name_for(backend.host) if t is not None else None,
                )
                if t is not None and self.transport is not None:
                    sslobj = self.transport.get_extra_info("ssl_object")
                    if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                        raise ConnectionError("the backend did not agree to HTTP/2 (ALPN h2)")
                # the backend's SETTINGS (its stream limit) come first: within the same time
                await self.ready.wait()
        except (TimeoutError, OSError) as exc:
            self._close_now()
            waiting, self.waiting = self.waiting, []
            for client, ex in waiting:
                if not client.closed and client.queue and client.queue[0] is ex:
                    attempts.connect_failed(client, ex, backend, exc)
            return
        self.pool.connects += 1
        self._start_waiting()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.state = OPEN
        self.pool.open += 1
        self._write()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.engine.feed(data)
        except EngineError as exc:
            log.warning("backend %s broke HTTP/2: %s", self.backend.authority, exc)
            self._write()
            self._close_now()
            return
        if not self.ready.is_set() and self.state == OPEN:
            self.ready.set()  # (a server's first frame is its SETTINGS: RFC 9113 §3.4)
        streams = self.streams
        for kind, sid, payload, end in events:
            s = streams.get(sid) if sid else None
            if s is not None:
                if kind == DATA:
                    s.on_data(payload, end)
                elif kind == RESPONSE:
                    s.on_response(payload, end)
                elif kind == TRAILERS:
                    s.on_trailers(payload)
                elif kind == RESET:
                    s.on_reset(payload)
            elif kind == DATA:
                self.engine.consumed(sid, len(payload))  # (a stream poise is done with)
            if kind == WINDOW:
                self._unblock()
            elif kind == GOAWAY:
                self.goaway = payload
                for s in [s for i, s in streams.items() if i > payload]:
                    s.on_reset(REFUSED_STREAM)  # not processed: safe to send again
        self._write()
        if self.goaway < 2**31 and not self.streams:
            self._close_now()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == OPEN:
            self.pool.open -= 1
        self.state = CLOSED
        with contextlib.suppress(ValueError):
            self.pool.mux.remove(self)
        for s in list(self.streams.values()):
            s.on_reset(-1)
        self.streams.clear()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        for s in self.streams.values():
            if s.client is not None:
                s.client.upstream_write_paused(True)

    def resume_writing(self) -> None:
        for s in self.streams.values():
            if s.client is not None and s not in self.blocked:
                s.client.upstream_write_paused(False)

    # -- output ------------------------------------------------------------------------------

    def kick(self) -> None:
        if not self.kicked and self.state == OPEN:
            self.kicked = True
            self.ctx.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.kicked = False
        self._write()

    def _write(self) -> None:
        if self.transport is not None and self.state == OPEN:
            out = self.engine.take()
            if out:
                self.transport.write(out)

    def _unblock(self) -> None:
        for s in list(self.blocked):
            if s.closed or self.engine.queued(s.sid) < HIGH // 4:
                self.blocked.discard(s)
                if s.client is not None:
                    s.client.upstream_write_paused(False)

    def stream_done(self, s: MuxStream) -> None:
        self.streams.pop(s.sid, None)
        self.blocked.discard(s)
        if not self.streams and not self.waiting:
            self.idle_since = self.ctx.now  # (Pool.expire closes it after pool.idle_timeout)
        if self.waiting and self.goaway == 2**31:
            self.ctx.loop.call_soon(self._start_waiting)
        if self.goaway < 2**31 and not self.streams:
            self.kick()
            self.ctx.loop.call_soon(self._close_now)

    def _close_now(self) -> None:
        if self.state != CLOSED:
            if self.state == OPEN:
                self.pool.open -= 1
            self.state = CLOSED
        with contextlib.suppress(ValueError):
            self.pool.mux.remove(self)
        if self.transport is not None:
            self.transport.close()

    def usable(self) -> bool:
        return self.state != CLOSED

    def close(self) -> None:
        """(Pool.close_all, at shutdown) GOAWAY and close."""
        if self.state == OPEN:
            self.engine.goaway(0, 0)
            self._write()
        self._close_now()

    def __repr__(self) -> str:
        return f"H2Backend({self.backend.authority}, streams={len(self.streams)})"
