"""HTTP/2 towards clients: one ``H2Session`` per connection, one ``H2Stream`` per request.

Theory of operation
-------------------
A session owns the socket and its framing engine (h2/engine.py). Each request stream becomes
an ``Exchange`` exactly like an HTTP/1.1 request (h2/convert.py builds its HTTP/1.1 head):
routed, balanced, retried, logged and counted by the same code, because its stream *is* a
client connection to that code: ``H2Stream`` subclasses ``ClientConnection`` with a queue
of one, and overrides what touches the byte stream. The backend side is unchanged
(l7/upstream.py, HTTP/1.1); it hands the stream the response as HTTP/1.1 bytes, the head
whole and the body unframed (``Exchange.unframed``: never re-chunked), and the stream turns
the head into an HTTP/2 header list and the body into DATA.

Output is gathered: a stream's response pieces wait for the end of the loop's turn
(``H2Session.kick``), so responses that complete together leave in one write, and a
response that completes at once leaves as HEADERS + DATA with END_STREAM (or HEADERS alone).

Flow control, both ways:
* response bodies are queued in the engine whatever the client's window; past
  ``STREAM_HIGH`` queued bytes the stream stops reading its backend (``pause_writing``)
  until a WINDOW_UPDATE brings it under ``STREAM_LOW``; a stream that stays blocked longer
  than ``timeouts.client_send`` is reset (a client holding its window at zero holds
  nothing of poise's for longer). When the socket itself backs up, every stream pauses and
  the session reads nothing more from the client until it drains (a client that does not
  read cannot make poise buffer: PING and SETTINGS floods included);
* request bodies are acknowledged (WINDOW_UPDATE) only when passed to the backend: while
  a stream's backend is not taking more, or its body waits for a backend connection past
  ``QUEUE_BODY_LIMIT``, the client's window is not reopened.

Abuse (each one refused without harm to other clients, tests/h2/test_attacks.py): the
engine's limits (CONTINUATION frames, reset rate, header list size), at most
``max_concurrent_streams`` streams at a time (nghttp2 and h2 refuse more), a reset stream's
backend work stopped at once (its backend connection closed), and a connection whose client
resets more than half of its streams before their response (after ``RESET_GRACE`` streams)
ended with GOAWAY ENHANCE_YOUR_CALM. A request stream above the last stream id of a GOAWAY
poise sent is never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from poise import failures, grpc
from poise.h2 import convert
from poise.h2.engine import (
    DATA,
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    REQUEST,
    RESET,
    WINDOW,
    EngineError,
    NativeEngine,
    PureEngine,
    Settings,
    make,
)
from poise.l7.client import ClientConnection
from poise.l7.reader import PAUSE_QUEUE, QUEUE_BODY_LIMIT
from poise.l7.request import (
    Exchange,
    Reject,
    abandon,
    connection_fields,
    forwarding_fields,
    request_ended,
    settle,
)

if TYPE_CHECKING:
    from poise.l7.context import Context
    from poise.tls.contexts import ListenerTls

log = logging.getLogger("poise.proxy")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_HIGH: Final = 256 * 1024  # queued response bytes of a stream: stop reading its backend
STREAM_LOW: Final = 64 * 1024  # ... and read it again below this
LINGER: Final = 2.0  # seconds an errored connection reads and drops before closing
RESET_GRACE: Final = 100  # streams before the premature-reset ratio is judged
_INF: Final = float("inf")
CRLF: Final = b"\r\n"
# poise's own error answers to gRPC requests, as grpc-status (gRPC's own mapping of HTTP
# statuses, doc/http-grpc-status-mapping.md in grpc/grpc; a timeout is DEADLINE_EXCEEDED,
# a limit RESOURCE_EXHAUSTED)
GRPC_CODES: Final = {
    400: grpc.CODES["INTERNAL"],
    404: grpc.CODES["UNIMPLEMENTED"],
    405: grpc.CODES["UNIMPLEMENTED"],
    408: grpc.CODES["DEADLINE_EXCEEDED"],
    413: grpc.CODES["RESOURCE_EXHAUSTED"],
    414: grpc.CODES["RESOURCE_EXHAUSTED"],
    429: grpc.CODES["RESOURCE_EXHAUSTED"],
    431: grpc.CODES["RESOURCE_EXHAUSTED"],
    501: grpc.CODES["UNIMPLEMENTED"],
    502: grpc.CODES["UNAVAILABLE"],
    503: grpc.CODES["UNAVAILABLE"],
    504: grpc.CODES["DEADLINE_EXCEEDED"],
}


class H2Stream(ClientConnection):
    """One request stream, seen by the proxy's request path as a client connection with one
    exchange (see the module docstring). ``closed``: the stream is over for poise (reset,
    or the session gone)."""

    __slots__ = (
        "body_end", "ended", "hdrs", "headed", "owed", "pend", "pend_bytes", "rst", "session",
        "sid", "trailers", "want",
    )  # fmt: skip

    def __init__(self, session: H2Session, sid: int) -> None:
        # ClientConnection.__init__ is not called: a stream has no byte stream of its own
        # (no reader, no transport); these are the fields its inherited methods read
        self.session = session
        self.sid = sid
        self.ctx = session.ctx
        self.listener = session.listener
        self.tls = session.tls
        self.tls_fields = session.tls_fields
        self.transport = None
        self.queue = []
        self.deadline = _INF
        self.drain_at = _INF
        self.closed = False
        self.close_after = False
        self.paused = 0
        self.write_paused = False
        self.peer = session.peer
        self.forwarded = session.forwarded
        self.trusted = session.trusted
        self.send_deadline = _INF
        self.held = []
        self.last_write = False
        self.hdrs: list[tuple[bytes, bytes]] | None = None  # response head not yet submitted
        self.pend: list[bytes | memoryview] = []  # response body not yet submitted
        self.pend_bytes = 0
        self.trailers: list[tuple[bytes, bytes]] | None = None  # to end the response with
        self.want = False  # in the session's list of streams with output to submit
        self.headed = False  # the final response head has come from the backend side
        self.ended = False  # END_STREAM or RST_STREAM submitted
        self.rst = False  # RST_STREAM submitted (or received)
        self.owed = 0  # request body bytes passed on but not yet acknowledged (paused)
        self.body_end = -1  # the request's Content-Length, -1 when none was given

    # -- response towards the client (what the backend side calls) -------------------------

    def forward(self, out: list[bytes | memoryview]) -> None:
        if self.closed:
            return
        if not self.headed:
            i = 0
            n = len(out)
            while i < n:
                status, headers = convert.response(out[i])
                i += 1
                if status >= 200:
                    self.hdrs = headers
                    self.headed = True
                    break
                # 1xx interim (100 Continue, 103 Early Hints): not relayed over HTTP/2
            out = out[i:]
        if out:
            self.pend += out
            n = self.pend_bytes
            for piece in out:
                n += len(piece)
            self.pend_bytes = n
            if n > STREAM_HIGH and not self.write_paused:
                # (libuv reads a backend up to 32 times in one turn of the loop: the pause
                # cannot wait for the submit at the end of the turn)
                self.pause_writing()
                self.session.blocked.add(self)
        if not self.want:
            self.want = True
            self.session.kick(self)

    def forward_last(self, out: list[bytes | memoryview]) -> None:
        self.forward(out)

    # (an HTTP/2 backend's response, h2/upstream.py: as it came, trailers included)

    def relay_head(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        if not self.closed:
            self.hdrs = [(k, v) for k, v in headers if k not in convert.CONNECTION_SPECIFIC]
            self.headed = True
            if not self.want:
                self.want = True
                self.session.kick(self)

    def relay_data(self, data: bytes) -> None:
        self.forward([data])

    def relay_trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.trailers = [(k, v) for k, v in headers if k[:1] != b":"]

    def submit(self, end: bool) -> None:
        """Hand what is held to the engine (``end``: with END_STREAM)."""
        if self.ended:
            return
        session = self.session
        engine = session.engine
        sid = self.sid
        hdrs = self.hdrs
        pend = self.pend
        if end and self.trailers is not None:  # (a gRPC response: data, then trailers)
            if hdrs is not None:
                self.hdrs = None
                engine.headers(sid, hdrs, False)
            if pend:
                self.pend = []
                self.pend_bytes = 0
                engine.data(sid, b"".join(pend), False)
            engine.trailers(sid, self.trailers)
            self.ended = True
            return
        if hdrs is not None:
            self.hdrs = None
            if end and not pend:
                engine.headers(sid, hdrs, True)
                self.ended = True
                return
            engine.headers(sid, hdrs, False)
        if pend:
            self.pend = []
            self.pend_bytes = 0
            data = pend[0] if len(pend) == 1 else b"".join(pend)
            engine.data(sid, bytes(data), end)
            self.ended = end
            if not end and not self.write_paused and engine.queued(sid) > STREAM_HIGH:
                self.pause_writing()
                session.blocked.add(self)
        elif end:
            engine.data(sid, b"", True)
            self.ended = True

    def response_complete(self, ex: Exchange) -> None:
        ex.response_done = True
        ex.conn = None
        if ex.load is not None:
            settle(ex, ok=ex.status < 500 and ex.status != 429)
        ctx = self.ctx
        if ex.retrying:
            ex.retrying = False
            ctx.retries_active -= 1
        ctx.stats.responses += 1
        t0 = ex.t0
        if t0:
            ex.t0 = 0.0
            elapsed = ctx.clock() - t0
            ctx.latency.observe(elapsed)
            if ctx.access is not None:
                ctx.access.record(ex, self.peer, elapsed, "ok")
        self.submit(True)
        self.session.stream_done(self)

    def finish(self, ex: Exchange) -> None:
        t0 = ex.t0
        if t0:
            ex.t0 = 0.0
            ctx = self.ctx
            elapsed = ctx.clock() - t0
            ctx.latency.observe(elapsed)
            if ctx.access is not None:
                ctx.access.record(ex, self.peer, elapsed, "local" if ex.local else "ok")
        self.session.stream_done(self)

    def answer(self, ex: Exchange, status: int, message: str) -> None:
        from poise.l7 import http

        self._send_error(ex, http.error_response(status, message, self.ctx.date.value, close=False))

    def _send_error(self, ex: Exchange, response: bytes, *, close: bool = False) -> None:
        ex.response_done = True
        ex.response_started = True
        ex.local = True
        ex.status = int(response[9:12])
        if ex.retrying:
            ex.retrying = False
            self.ctx.retries_active -= 1
        self.ctx.stats.responses += 1
        if self.closed:
            return
        end = response.find(b"\r\n\r\n") + 4
        self.headed = True
        if ex.grpc:
            # gRPC clients read the outcome from grpc-status, in a trailers-only response
            code = GRPC_CODES.get(ex.status, grpc.CODES["UNKNOWN"])
            message = response[end:].decode("utf-8", "replace").strip()
            self.hdrs = [(k.encode(), v.encode()) for k, v in grpc.trailers_only(code, message)]
            self.pend = []
        else:
            _, headers = convert.response(response[:end])
            self.hdrs = headers
            self.pend = [response[end:]]
        self.submit(True)
        self.session.kick(None)
        self.finish(ex)

    def _linger(self) -> None:
        self.close()

    def close(self) -> None:
        """poise ends the stream before its response did (a backend that broke mid-response,
        say): the client sees it reset, never a truncated body taken as whole."""
        if self.closed:
            return
        if not self.ended:
            self.reset(INTERNAL_ERROR)
        self.session.kick(None)
        self.session.stream_done(self)

    def stop_upload(self) -> None:
        """The request was answered whole while its body is still coming: the answer goes
        out first (nghttp2 drops a stream's queued frames once it is reset), then
        RST_STREAM NO_ERROR tells the client to stop sending (RFC 9113 §8.1)."""
        self.session._write()
        self.reset(NO_ERROR)

    def reset(self, code: int) -> None:
        """Send RST_STREAM (once)."""
        if not self.rst:
            self.rst = self.ended = True
            self.session.engine.reset(self.sid, code)

    # -- request body --------------------------------------------------------------------

    def body(self, data: bytes, end: bool) -> None:
        ex = self.queue[0] if self.queue else None
        n = len(data)
        if ex is None or ex.request_done:
            self.session.engine.consumed(self.sid, n)
            return
        ctx = self.ctx
        ex.body_bytes += n
        if n:
            self.deadline = ctx.clock() + ctx.client_body_timeout
        if (ctx.max_body_size and ex.body_bytes > ctx.max_body_size) or (
            self.body_end >= 0 and ex.body_bytes > self.body_end
        ):
            self.refuse_body(ex, ex.body_bytes <= self.body_end or self.body_end < 0)
            return
        if n and not ex.response_done:
            pieces: tuple[bytes, ...] = (b"%x\r\n" % n, data, CRLF) if ex.chunked else (data,)
            kept = ex.kept
            if kept is not None:
                if ex.body_bytes <= ctx.retry_body_max:
                    kept += pieces
                else:
                    ex.kept = None
            conn = ex.conn
            if conn is not None:
                conn.send(pieces)
            else:
                ex.pending += pieces
                ex.pending_bytes += n
                if ex.pending_bytes > QUEUE_BODY_LIMIT:
                    self.pause(PAUSE_QUEUE)
        if n:
            if self.paused:
                self.owed += n
            else:
                self.session.engine.consumed(self.sid, n)
        if end:
            self.body_done(ex)

    def body_done(self, ex: Exchange) -> None:
        if self.body_end >= 0 and ex.body_bytes != self.body_end:
            self.refuse_body(ex, False)
            return
        self.deadline = _INF
        if not request_ended(ex) and ex.response_done and not self.closed:
            self.finish(ex)

    def refuse_body(self, ex: Exchange, too_large: bool) -> None:
        """A body over the size limit (413, when nothing was answered yet) or unlike its
        Content-Length (the stream is malformed: reset, RFC 9113 §8.1.1)."""
        self.ctx.stats.bad_requests += 1
        if too_large and not ex.response_started:
            abandon(ex, self.ctx)
            self.answer(ex, 413, "Content Too Large")
            self.stop_upload()
            return
        abandon(ex, self.ctx)
        self.reset(PROTOCOL_ERROR)
        self.session.kick(None)
        self.session.stream_done(self)

    def pause(self, reason: int) -> None:
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.owed and not self.closed:
                owed, self.owed = self.owed, 0
                self.session.engine.consumed(self.sid, owed)
                self.session.kick(None)

    # -- timeouts -------------------------------------------------------------------------

    def on_send_timeout(self) -> None:
        """The client left this stream's window shut for timeouts.client_send."""
        self.send_deadline = _INF
        self.ctx.stats.client_timeouts += 1
        for ex in self.queue:
            abandon(ex, self.ctx)
        self.close()

    def on_timeout(self) -> None:
        """The request body stopped arriving (timeouts.client_body)."""
        self.deadline = _INF
        self.ctx.stats.client_timeouts += 1
        ex = self.queue[0] if self.queue else None
        if ex is not None and not ex.response_started:
            abandon(ex, self.ctx)
            late = failures.CLIENT_TIMEOUT
            self.ctx.stats.count(late.counter)
            self.answer(ex, late.status, late.message)
            self.stop_upload()
            return
        if ex is not None:
            abandon(ex, self.ctx)
        self.close()

    def __repr__(self) -> str:
        return f"H2Stream({self.peer.decode()}, {self.sid})"


class H2Session:
    """One HTTP/2 client connection (an asyncio protocol; see the module docstring)."""

    __slots__ = (
        "blocked",
        "closed",
        "ctx",
        "deadline",
        "drain_at",
        "engine",
        "forwarded",
        "goaway_sent",
        "kicked",
        "kind",
        "last_sid",
        "lingering",
        "listener",
        "peer",
        "premature",
        "read_paused",
        "settings",
        "started",
        "streams",
        "tls",
        "tls_fields",
        "transport",
        "trusted",
        "wanting",
        "write_paused",
    )

    def __init__(
        self,
        ctx: Context,
        listener: str,
        tls: ListenerTls | None,
        settings: Settings,
        kind: str,
    ) -> None:
        self.ctx = ctx
        self.listener = listener
        self.tls = tls
        self.settings = settings
        self.kind = kind
        self.engine: NativeEngine | PureEngine = make(kind, settings)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams not reading their backend (window)
        self.wanting: list[H2Stream] = []  # streams with response output to submit
        self.kicked = False
        self.closed = False
        self.lingering = False  # closed after an error: reading and dropping (see close)
        self.write_paused = False
        self.read_paused = False
        self.goaway_sent = False
        self.last_sid = 0  # the highest request stream id taken
        self.started = 0  # request streams started
        self.premature = 0  # of those, reset by the client before their response ended
        self.deadline = _INF
        self.drain_at = _INF
        self.peer = b""
        self.forwarded = b""
        self.tls_fields = b""
        self.trusted = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.stats.connections_accepted += 1
        ctx.stats.http2_connections += 1
        ctx.sessions.add(self)
        self.peer, self.trusted, self.tls_fields, self.forwarded = connection_fields(
            ctx, transport, self.tls
        )
        transport.set_write_buffer_limits(high=256 * 1024)
        self.deadline = ctx.clock() + ctx.client_header_timeout
        if ctx.draining:
            self.drain_at = ctx.clock() + ctx.drain_grace
        self._write()  # the server's SETTINGS
        if len(ctx.clients) + len(ctx.sessions) > ctx.limits.max_connections:
            ctx.stats.count(failures.CONNECTIONS_REFUSED.counter)
            self.engine.goaway(NO_ERROR, 0)
            self._write()
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.sessions.discard(self)
        for stream in list(self.streams.values()):
            for ex in stream.queue:
                abandon(ex, self.ctx)
            stream.closed = True
        self.streams.clear()
        self.blocked.clear()
        self.wanting.clear()

    def eof_received(self) -> bool | None:
        return None  # a client that ended its side of an HTTP/2 connection is gone

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            if not stream.write_paused:
                stream.pause_writing()
        if self.transport is not None and not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in self.streams.values():
            if stream.write_paused and stream not in self.blocked:
                stream.resume_writing()
        if self.transport is not None and self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.engine.feed(data)
        except EngineError as exc:
            self._fail(exc)
            return
        if events:
            self._handle(events)
        if not self.closed and self.engine.closing:
            self.goaway_sent = True  # (the engine's own GOAWAY, with its error code)
            self._write()
            self.close(linger=True)
            return
        self._write()

    # -- events ----------------------------------------------------------------------------

    def _handle(self, events: list[tuple[int, int, Any, bool]]) -> None:
        # A batch may hold a request and its own reset (a rapid-reset client): requests are
        # taken first and started only if the same batch does not reset them.
        new: dict[int, tuple[Any, bool]] | None = None
        for kind, sid, payload, end in events:
            if kind == REQUEST:
                if self.goaway_sent:
                    self.engine.reset(sid, REFUSED_STREAM)
                    continue
                if new is None:
                    new = {}
                new[sid] = (payload, end)
                self.last_sid = max(self.last_sid, sid)
            elif kind == WINDOW:
                self._unblock()
            elif new is not None and sid in new:
                if kind == RESET:  # opened and reset in one read: never started
                    del new[sid]
                    self.started += 1
                    self.premature += 1
                    continue
                self._start_pending(new)
                new = None
                self._on_stream(kind, sid, payload, end)
            else:
                self._on_stream(kind, sid, payload, end)
        if new:
            self._start_pending(new)
        if self.started > RESET_GRACE and self.premature * 2 > self.started:
            log.warning("HTTP/2 client %s reset most of its streams: connection ended",
                        self.peer.decode())  # fmt: skip
            self._fail(EngineError("premature resets", ENHANCE_YOUR_CALM))

    def _on_stream(self, kind: int, sid: int, payload: Any, end: bool) -> None:
        """DATA, trailers (the end of the request body: trailers are not passed on to
        HTTP/1.1) or RST_STREAM on a stream that was started."""
        stream = self.streams.get(sid)
        if kind == RESET:
            if stream is not None:
                self._client_reset(stream)
        elif stream is not None:
            stream.body(payload if kind == DATA else b"", end)
        elif kind == DATA:
            self.engine.consumed(sid, len(payload))  # (a stream poise is done with)

    def _start_pending(self, new: dict[int, tuple[Any, bool]]) -> None:
        for sid, (headers, end) in list(new.items()):
            del new[sid]
            self._request(sid, headers, end)
            if self.closed:
                return

    def _request(self, sid: int, headers: Any, end: bool) -> None:
        ctx = self.ctx
        stream = H2Stream(self, sid)
        self.streams[sid] = stream
        self.started += 1
        self.deadline = _INF
        ex = Exchange()
        ex.t0 = ctx.clock()
        ex.unframed = True
        stream.queue.append(ex)
        ctx.stats.requests += 1
        ctx.stats.http2_requests += 1
        try:
            req = convert.request(
                headers, ctx.header_kinds, max_target=ctx.max_target, max_fields=ctx.max_headers
            )
            if req.content_length is not None:
                stream.body_end = int(req.content_length)
                if ctx.max_body_size and stream.body_end > ctx.max_body_size:
                    raise Reject(413, "Content Too Large")
                if end and stream.body_end != 0:
                    raise Reject(400, "Bad Request")
        except Reject as exc:
            ctx.stats.bad_requests += 1
            ctx.stats.rejects[exc.status] = ctx.stats.rejects.get(exc.status, 0) + 1
            ex.request_done = True
            ex.started = True
            stream.answer(ex, exc.status, exc.message)
            if not end:
                stream.stop_upload()  # the body is not wanted
            return
        if req.content_type is not None and grpc.is_grpc(req.content_type.decode("latin-1")):
            ex.grpc = True
            if req.grpc_timeout is not None:
                left = grpc.parse_timeout(req.grpc_timeout.decode("latin-1"))
                if left is not None:  # the request's deadline, over all its tries
                    ex.until = ex.t0 + left
        method = req.method
        ex.method = method
        ex.is_head = method == b"HEAD"
        ex.target = target = req.target
        ex.host = host = req.authority
        ex.headers = req.fields
        ex.has_body = not end
        framing, ex.chunked = convert.framing(req, body=not end)
        if req.fwd is not None or not ctx.plain_forwarding:
            fields = forwarding_fields(
                ctx, ex, peer=self.peer, trusted=self.trusted, fwd=req.fwd, host=host,
                headers=req.fields, https=self.tls is not None,
            )  # fmt: skip
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\n", *fields, self.tls_fields, framing, CRLF)
            )
        else:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\nHost: ", host, CRLF, *req.fields,
                 self.forwarded, b"X-Forwarded-Host: ", host, CRLF, framing, CRLF)
            )  # fmt: skip
        if end:
            ex.request_done = True
        else:
            stream.deadline = ctx.clock() + ctx.client_body_timeout
            if ctx.retry_body_max:
                ex.kept = []
        stream.start(ex)

    def _client_reset(self, stream: H2Stream) -> None:
        """The client reset a stream: its backend work stops now."""
        if not stream.ended:
            self.premature += 1
        for ex in stream.queue:
            abandon(ex, self.ctx)
        stream.rst = stream.ended = True
        self.stream_done(stream)

    def _unblock(self) -> None:
        if not self.blocked:
            return
        engine = self.engine
        for stream in list(self.blocked):
            if stream.closed or engine.queued(stream.sid) < STREAM_LOW:
                self.blocked.discard(stream)
                if stream.write_paused and not self.write_paused and not stream.closed:
                    stream.resume_writing()

    # -- output ----------------------------------------------------------------------------

    def kick(self, stream: H2Stream | None) -> None:
        """Output is waiting: submit and write it at the end of this turn of the loop."""
        if stream is not None:
            self.wanting.append(stream)
        if not self.kicked and not self.closed:
            self.kicked = True
            self.ctx.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.kicked = False
        wanting = self.wanting
        if wanting:
            self.wanting = []
            for stream in wanting:
                stream.want = False
                if not stream.closed:
                    stream.submit(False)
        self._write()
        if self.ctx.draining and not self.streams and not self.closed:
            self.close()  # the last stream of a draining connection is done

    def _write(self) -> None:
        if self.closed or self.transport is None:
            return
        out = self.engine.take()
        if out:
            self.transport.write(out)

    def stream_done(self, stream: H2Stream) -> None:
        """``stream`` is over for poise (answered in full, reset, or refused)."""
        if stream.closed:
            return
        stream.closed = True
        sid = stream.sid
        # (answered before the request ended: the rest of its body, if the client sends it,
        # is taken and dropped, as for any stream poise is done with. RFC 9113 §8.1 allows
        # RST_STREAM NO_ERROR here, but gRPC clients take that for a failed call.)
        stream.queue = []
        self.streams.pop(sid, None)
        self.blocked.discard(stream)
        if not self.streams:
            ctx = self.ctx
            self.deadline = ctx.clock() + ctx.client_idle_timeout
            if ctx.draining:
                self.drain_at = ctx.clock()  # closed by the next flush: see flush
        if not self.kicked and not self.closed:
            self.kicked = True
            self.ctx.loop.call_soon(self.flush)

    # -- the context's sweep, drain, closing -----------------------------------------------

    def tick(self, now: float) -> int:
        """Called by the context's sweep: the session's and its streams' deadlines; the
        number of streams in flight."""
        if self.lingering:
            if self.deadline < now and self.transport is not None:
                self.ctx.sessions.discard(self)
                self.transport.close()
            return 0
        if self.deadline < now and not self.streams:
            self.close()  # idle for timeouts.client_idle (or no preface in time): GOAWAY
            return 0
        if self.ctx.draining and self.drain_at < now and not self.goaway_sent:
            self.goaway(NO_ERROR)  # still busy after the drain's grace: no new streams

        expired: list[Any] = []
        for stream in self.streams.values():
            if stream.send_deadline < now:
                expired.append(stream.on_send_timeout)
            elif stream.deadline < now:
                expired.append(stream.on_timeout)
            elif stream.queue:
                conn = stream.queue[0].conn
                if conn is not None and conn.deadline < now:
                    expired.append(conn.on_timeout)
        for call in expired:
            call()
        return len(self.streams)

    def is_idle(self) -> bool:
        return not self.streams

    def begin_drain(self, until: float) -> None:
        """A drain began. An idle connection gets GOAWAY (naming the last stream poise took,
        so the client knows any later one is safe to send elsewhere) and closes now; a busy
        one is served until its streams are done, then gets it and closes (as an HTTP/1.1
        connection gets ``Connection: close`` on its last response). A GOAWAY while
        streams are in flight would be the standard way, but clients built on the ``h2``
        package (httpx among them) fail every open stream on any GOAWAY; so it goes to a
        busy connection only if it is still busy after ``until`` (timeouts.drain_idle),
        to stop it taking new streams."""
        self.drain_at = until
        if not self.streams:
            self.close()

    def goaway(self, code: int) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self.engine.goaway(code, self.last_sid)
            self._write()

    def _fail(self, exc: EngineError) -> None:
        """A connection error: what the engine has to say (GOAWAY), then the end."""
        log.info("HTTP/2 client %s: %s", self.peer.decode(), exc)
        self.ctx.stats.bad_requests += 1
        self.goaway_sent = True
        with contextlib.suppress(Exception):
            self.engine.goaway(exc.code, self.last_sid)
        self._write()
        self.close(linger=True)

    def close(self, *, linger: bool = False) -> None:
        """GOAWAY (unless sent), then the end. ``linger``: after an error the client may
        still be sending; closing with its bytes unread would reset the connection and
        could destroy the GOAWAY before the client reads it, so poise half-closes and
        reads and drops what comes for up to ``LINGER`` seconds first (as on HTTP/1.1)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if not self.goaway_sent:
            self.goaway(NO_ERROR)
        self.closed = True
        for stream in list(self.streams.values()):
            for ex in stream.queue:
                abandon(ex, self.ctx)
            stream.closed = True
        self.streams.clear()
        if linger and transport.can_write_eof():
            with contextlib.suppress(OSError):
                transport.write_eof()
                self.lingering = True
                self.deadline = self.ctx.clock() + LINGER
                if self.read_paused:
                    self.read_paused = False
                    transport.resume_reading()
                return
        self.ctx.sessions.discard(self)
        transport.close()

    def __repr__(self) -> str:
        return f"H2Session({self.peer.decode()}, streams={len(self.streams)})"
