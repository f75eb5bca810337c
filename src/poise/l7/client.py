"""The client side of the HTTP/1.1 proxy: one ``ClientConnection`` per accepted socket.

Theory of operation
-------------------
A read that is one whole plain request head (l7/scan.py: bodiless HTTP/1.1, nothing to
judge) takes one scan, in C when built (``_plain``); everything else goes to httptools
(llhttp), which parses the byte stream and calls back per event. Either way each request
becomes an ``Exchange`` appended to ``queue``. Only ``queue[0]`` is active: it is routed,
given a pooled (or new) upstream connection, and its head and body are written there as they
arrive. Later pipelined requests wait in the queue with their body bytes held (reading pauses
past a bound), so responses leave in request order (RFC 9112 §9.3.2).

The request head is rebuilt, never copied (docs/http-rules.md): the request line is re-emitted as
HTTP/1.1, hop-by-hop fields and every field named by ``Connection`` are dropped (RFC 9110
§7.6.1) *before* our X-Forwarded-* are added, and framing is re-declared by us: the validated
Content-Length, or ``Transfer-Encoding: chunked`` with the body re-chunked (extensions and
trailers dropped; RFC 9112 §7.1).

Framing doubts are never forwarded: Content-Length and Transfer-Encoding together, a
Content-Length that is not ``1*DIGIT`` or differs between copies, a transfer coding other
than a lone ``chunked``, TE in HTTP/1.0, a missing or repeated Host (RFC 9112 §3.2, §6.1,
§6.3) each get 400 (501 for an unknown coding) and the connection is closed; bytes after a
rejected request are never parsed.

An exchange ends when the request has been read *and* the response written; then the next
queued request starts, or the connection closes when either side asked for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, cast

import httptools

from poise.balancing import keys
from poise.l7 import attempts, http
from poise.l7.request import (
    Exchange,
    Reject,
    RequestMemo,
    field_list,
    forwarding_fields,
    origin_form,
    settle,
)
from poise.l7.tunnel import Tunnel
from poise.l7.upstream import UpstreamConnection

if TYPE_CHECKING:
    from poise.l7.context import Context
    from poise.models import Backend
    from poise.routing import Group
    from poise.tls.contexts import ListenerTls
    from poise.upstream.pool import Pool

log = logging.getLogger("poise.proxy")

CRLF: Final = b"\r\n"
EOH: Final = b"\r\n\r\n"  # the end of a head
MEMO_MAX: Final = 1024  # bytes: a longer request head is not remembered (memory per connection)
MEMO_MISSES: Final = 4  # heads in a row that were not the remembered one: stop remembering
FIRST_HEADS_MAX: Final = 256  # (listener, peer) pairs whose last head new connections may reuse
NAMES_MAX: Final = 512  # distinct field-name spellings whose kind Context.name_kinds keeps
LINGER: Final = 2.0  # seconds to drain a client after an error response before closing
QUEUE_BODY_LIMIT: Final = 1 << 20  # body bytes held for not-yet-started pipelined requests
_INF: Final = float("inf")
_HOSTS_SEEN: set[bytes] = set()  # Host values already validated (bounded)
_PAUSE_UPSTREAM: Final = 1  # client reading paused: the upstream cannot take more request body
_PAUSE_QUEUE: Final = 2  # client reading paused: too much held for queued requests


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_after_close",
        "_begun",
        "_cl",
        "_clean",
        "_clean_method",
        "_conn_tokens",
        "_feed",
        "_fresh",
        "_fwd",
        "_head_raw",
        "_head_size",
        "_headers",
        "_kinds",
        "_known",
        "_memo",
        "_misses",
        "_more",
        "_n_headers",
        "_names",
        "_src",
        "_te",
        "_upgrade",
        "close_after",
        "closed",
        "ctx",
        "cur",
        "deadline",
        "drain_at",
        "forwarded",
        "held",
        "in_body",
        "listener",
        "parser",
        "paused",
        "peer",
        "queue",
        "send_deadline",
        "tls",
        "tls_fields",
        "transport",
        "trusted",
        "upgrading",
        "write_paused",
    )

    def __init__(self, ctx: Context, listener: str, tls: ListenerTls | None = None) -> None:
        self.ctx = ctx
        self.listener = listener
        self.tls = tls  # an HTTPS listener's TLS (the client-certificate subject header)
        self.tls_fields = b""  # that header's line, when the client's certificate was verified
        self._kinds = ctx.header_kinds
        self._names = ctx.name_kinds  # the same by the names' spelling (a cache)
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # a list, not a deque: it holds one request but for pipelining clients, and compiled,
        # list operations are inline while a deque's are method calls
        self.queue: list[Exchange] = []
        self.cur: Exchange | None = None
        self.deadline = _INF
        self.drain_at = _INF  # draining: when this connection, if idle, is closed (Context)
        self.closed = False
        self.close_after = False
        self.paused = 0
        self.write_paused = False
        self.peer = b""
        self.forwarded = b""
        self._headers: list[bytes] = []
        self._n_headers = 0
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._conn_tokens: list[bytes] | None = None
        self._fwd: list[tuple[bytes, bytes, bytes]] | None = None  # client X-Forwarded-*, ...
        self._head_size = 0  # bytes of the current request head, as parsed
        self._head_raw = 0  # bytes received while not in a body (a guard, see data_received)
        self.in_body = False
        self.trusted = False
        self.send_deadline = _INF
        self._upgrade: bytes | None = None
        self.upgrading = False  # an upgrade request is waiting for the backend's answer
        self.held: list[bytes] = []  # client bytes after it, not parsed until that answer
        self._memo: RequestMemo | None = None  # the last bodiless request head, see _repeat
        self._misses = 0  # requests since the last one that was _memo's (see MEMO_MISSES)
        self._begun = 0  # requests whose parsing began (on_message_begin)
        # a remembered request without keep-alive was taken (_repeat): the parser, which did
        # not see it, must act as llhttp does after one (see data_received)
        self._after_close = False
        # The raw bytes the request line is checked on (see _check_line): the read being
        # parsed, whether the parser was between requests when it came, the read the
        # current request began in, whether it began at that read's start, the later reads
        # of a head that spans reads, and a read already found free of doubled spaces.
        self._feed = b""
        self._fresh = False
        self._src = b""
        self._known = False
        self._more: list[bytes] | None = None
        self._clean: bytes | None = None
        self._clean_method = b""

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.stats.connections_accepted += 1
        ctx.clients.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            host = str(peer[0])
            self.peer = host.encode("ascii")
            # (is_trusted says False at once when no proxy is trusted, the usual case)
            self.trusted = bool(ctx.trusted) and ctx.is_trusted(host)
        else:
            self.peer = b"unknown"
        # Per connection, once: the X-Forwarded-For/-Proto lines are the same for every request
        # (and so is a client certificate's subject: the handshake is over by now).
        if self.tls is None:
            self.forwarded = b"X-Forwarded-For: " + self.peer + b"\r\nX-Forwarded-Proto: http\r\n"
        else:
            self.tls.count_session(transport)
            self.tls_fields = self.tls.subject_field(transport)
            self.forwarded = (
                b"X-Forwarded-For: " + self.peer + b"\r\nX-Forwarded-Proto: https\r\n"
                + self.tls_fields
            )  # fmt: skip
        transport.set_write_buffer_limits(high=256 * 1024)
        self.deadline = ctx.clock() + ctx.client_header_timeout
        if ctx.draining:
            # accepted as the drain began: its client has sent, or is sending, a request
            # that is served (with Connection: close) if it comes within the grace
            self.drain_at = ctx.clock() + ctx.drain_grace
        elif len(ctx.clients) > ctx.limits.max_connections:
            # Refuse politely rather than let accept() pressure hurt everyone in flight.
            ctx.stats.connections_refused += 1
            transport.write(
                http.error_response(503, "Too many connections", ctx.date.value, close=True)
            )
            self._linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.clients.discard(self)
        for ex in self.queue:
            _abandon(ex, self.ctx)
        self.queue.clear()
        self.parser = None

    def eof_received(self) -> bool | None:
        """The client shut down its sending side. Requests already read still get their
        responses (a half-close is not an abort); then the connection closes."""
        if self.parser is not None and self.queue and self.cur is None:
            self.close_after = True
            self.parser = None
            return True
        # Idle, or in the middle of a request that can now never be completed: an abort.
        # Returning None closes the transport; connection_lost abandons any upstream.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        # a client that takes nothing for timeouts.client_send is cut off (slow read)
        self.send_deadline = self.ctx.clock() + self.ctx.client_send_timeout
        if self.queue:
            up = self.queue[0].upstream
            if up is not None:
                up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = _INF
        if self.queue:
            up = self.queue[0].upstream
            if up is not None:
                up.resume_reading()

    def data_received(self, data: bytes) -> None:
        memo = self._memo
        if memo is None and self._begun == 0:  # (so self.cur is None)
            # The first read of a connection: a client that opens one connection per
            # request (Connection: close) sends the same head on each, from the same peer,
            # which gives the same result (the key holds all that the head is built from).
            first = self.ctx.first_heads.get((self.listener, self.peer, self.tls_fields))
            if (
                first is not None
                and data == first.raw
                and self.parser is not None
                and first.generation == self.ctx.generation
            ):
                self._memo = first
                self._repeat(first)
                return
        elif memo is not None and self.cur is None:
            if (
                data == memo.raw
                and self.parser is not None
                and memo.generation == self.ctx.generation
            ):
                self._misses = 0
                self._repeat(memo)
                return
            self._misses += 1
        parser = self.parser
        if parser is None:
            if self.upgrading:
                self.held.append(data)
                if sum(map(len, self.held)) > QUEUE_BODY_LIMIT:
                    self._pause(_PAUSE_QUEUE)
            return
        if self.cur is None and not self._after_close:
            # between requests: a plain head in one read takes one scan (l7/scan.py);
            # anything else is parsed below, which decides everything scan_request leaves
            ctx = self.ctx
            got = ctx.scan_request(
                data, ctx.max_target, ctx.max_headers, ctx.max_header_bytes, ctx.dropped_fields
            )
            if got is not None:
                self._plain(data, got)
                return
        self._feed = data
        self._fresh = fresh = self.cur is None  # the parser is between requests
        if not self.in_body:
            if not fresh:  # a request head that continues in this read
                more = self._more
                if more is None:
                    self._more = [data]
                else:
                    more.append(data)
            # httptools buffers an unfinished header field itself: stop a head that never
            # ends before it costs memory (the precise count is in on_url/on_header).
            self._head_raw += len(data)
            if self._head_raw > self.ctx.max_header_bytes and b"\r\n\r\n" not in data:
                self._reject(431, "Request Header Fields Too Large")
                return
        begun = self._begun
        try:
            if self._after_close:
                # llhttp after a request without keep-alive: CR and LF are skipped, anything
                # else is an error
                if data.strip(b"\r\n"):
                    raise httptools.HttpParserError("Data after `Connection: close`")
            else:
                parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            reason = exc.__context__
            if isinstance(reason, Reject):
                self._reject(reason.status, reason.message)
            else:
                log.error("internal error parsing a request", exc_info=reason)
                self._reject(500, "Internal Server Error")
        except httptools.HttpParserUpgrade as exc:
            rest = data[int(exc.args[0]) :]
            if self.queue and self.queue[-1].upgrade is not None:
                # What follows belongs to the new protocol if the backend agrees (101), or
                # is the next HTTP request if it does not: hold it until we know.
                self.upgrading = True
                self.parser = None
                self.held = [rest] if rest else []
            else:
                # An upgrade poise did not forward (not a GET, say): the backend answers
                # plain HTTP, so what follows is parsed as HTTP.
                self.parser = httptools.HttpRequestParser(self)
                if rest:
                    self.data_received(rest)
                    return
        except httptools.HttpParserError:
            self._reject(400, "Bad Request")
        else:
            if (
                fresh
                and self._begun == begun + 1
                and self.cur is None
                and len(data) <= MEMO_MAX
                and self._misses < MEMO_MISSES
                and data[-4:] == EOH
            ):
                self._remember(data)
        self._feed = b""  # (not kept: it may be a large piece of a body)
        self._clean = None
        queue = self.queue
        if queue and not queue[0].started and not self.closed:
            self._start(queue[0])

    def _remember(self, data: bytes) -> None:
        """``data`` was one whole request head, parsed: keep what poise made of it for when
        the same bytes come again (see _repeat), if the request is plain enough."""
        ex = self.queue[-1] if self.queue else None
        if (
            ex is not None
            and not ex.has_body
            and not ex.http10
            and ex.upgrade is None
            and ex.error is None
            and self.parser is not None
        ):
            self._memo = memo = RequestMemo(data, self.ctx.generation, ex)
            first = self.ctx.first_heads
            if len(first) >= FIRST_HEADS_MAX:
                first.clear()
            first[(self.listener, self.peer, self.tls_fields)] = memo

    def _repeat(self, memo: RequestMemo) -> None:
        """The same bodiless request head as before, in one read: what the parser callbacks
        would do for it, without parsing and rebuilding it again."""
        ex = memo.exchange()
        ex.t0 = self.ctx.clock()
        if not ex.keep_alive:
            self._after_close = True
        self._enqueue(ex)
        queue = self.queue
        if not queue[0].started and not self.closed:
            self._start(queue[0])

    def _enqueue(self, ex: Exchange) -> None:
        """A whole bodiless request (remembered or scanned): counted and queued."""
        self.ctx.stats.requests += 1
        self.deadline = _INF
        queue = self.queue
        queue.append(ex)
        if len(queue) > 32:
            self._pause(_PAUSE_QUEUE)  # a pipelining client far ahead of its responses

    def _plain(self, data: bytes, got: tuple[bytes, bytes, bytes, bytes, bool]) -> None:
        """A plain request head, scanned (l7/scan.py): what the parser callbacks would make
        of it. It has no body, and is HTTP/1.1 in origin form with a valid Host."""
        method, target, host, fields, keep_alive = got
        ctx = self.ctx
        ex = Exchange()
        ex.t0 = ctx.clock()
        ex.method = method
        ex.target = target
        ex.host = host
        ex.fields = fields
        ex.is_head = method == b"HEAD"
        ex.request_done = True
        if not keep_alive:
            ex.keep_alive = False
            self._after_close = True
        if ctx.plain_forwarding:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\nHost: ", host, CRLF, fields,
                 self.forwarded, b"X-Forwarded-Host: ", host, CRLF, CRLF)
            )  # fmt: skip
        else:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\n",
                 *forwarding_fields(ctx, ex, peer=self.peer, trusted=self.trusted, fwd=None,
                                   host=host, headers=field_list(ex), https=self.tls is not None),
                 self.tls_fields, CRLF)
            )  # fmt: skip
        self._begun += 1
        self._enqueue(ex)
        if len(data) <= MEMO_MAX and self._misses < MEMO_MISSES:
            self._remember(data)
        queue = self.queue
        if not queue[0].started and not self.closed:
            self._start(queue[0])

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        # where this request's line is: at the start of the read being parsed, or somewhere
        # in it (pipelined behind another request)
        self._src = self._feed
        self._known = self._fresh
        self._fresh = False
        self._more = None
        self.cur = ex = Exchange()
        ex.t0 = now = self.ctx.clock()  # one clock reading: the duration and the deadline
        self._headers = []
        self._n_headers = 0
        self._head_size = 0
        self._cl = None
        self._te = None
        self._conn_tokens = None
        self._fwd = None
        self._upgrade = None
        if not self.queue:
            self.deadline = now + self.ctx.client_header_timeout

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        assert ex is not None
        ex.target += url
        if len(ex.target) > self.ctx.max_target:
            raise Reject(414, "URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        self._head_size += len(name) + len(value) + 4
        ctx = self.ctx
        if self._n_headers > ctx.max_headers or self._head_size > ctx.max_header_bytes:
            raise Reject(431, "Request Header Fields Too Large")
        names = self._names
        kind = names.get(name)
        if kind is None:
            kind = self._kinds.get(name.lower(), http.PLAIN)
            if kind == http.PLAIN and name.find(b"_") >= 0:
                # Dropped, as nginx does (underscores_in_headers off): some frameworks read
                # "_" as "-", so "Transfer_Encoding" would become framing behind the proxy.
                kind = http.HOP
            if len(names) < NAMES_MAX and len(name) <= 64:
                names[name] = kind
        if kind == http.PLAIN:
            self._headers += (name, b": ", value, CRLF)
            return
        ex = self.cur
        assert ex is not None
        if kind == http.HOST:
            if ex.host:
                raise Reject(400, "Bad Request")
            if value not in _HOSTS_SEEN:  # the regex runs once per distinct Host value
                if not http.HOST_RE.fullmatch(value):
                    raise Reject(400, "Bad Request")
                if len(_HOSTS_SEEN) < 4096:
                    _HOSTS_SEEN.add(value)
            ex.host = value
        elif kind == http.CONTENT_LENGTH:
            v = value.strip(b" \t")
            if not http.CONTENT_LENGTH_RE.fullmatch(v):
                raise Reject(400, "Bad Request")
            if self._cl is not None and self._cl != v:
                raise Reject(400, "Bad Request")
            self._cl = v
        elif kind == http.TRANSFER_ENCODING:
            self._te = value if self._te is None else self._te + b"," + value
        elif kind == http.CONNECTION:
            tokens = http.connection_tokens(value)
            self._conn_tokens = tokens if self._conn_tokens is None else self._conn_tokens + tokens
        elif kind == http.FORWARDED:
            if self._fwd is None:
                self._fwd = []
            self._fwd.append((name.lower(), name, value))
        elif name.lower() == b"upgrade":
            self._upgrade = value  # forwarded only for a real upgrade request (see below)
        # other HOP fields: dropped

    def on_headers_complete(self) -> None:
        ex = self.cur
        parser = self.parser
        assert ex is not None and parser is not None
        ex.keep_alive = keep_alive = parser.should_keep_alive()
        tokens = self._conn_tokens
        # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0 and keeps 0.9, 1.0 and 2.0 connections
        # alive only when asked to: keep-alive without "Connection: keep-alive" is 1.1. Only
        # otherwise is the version asked for (get_http_version formats a string).
        if not keep_alive or (tokens is not None and b"keep-alive" in tokens):
            version = parser.get_http_version()
            if version != "1.1":
                if version == "1.0":
                    ex.http10 = True
                elif version.startswith("2"):
                    raise Reject(505, "HTTP Version Not Supported")
                else:
                    raise Reject(400, "Bad Request")
        method = parser.get_method()
        ex.method = method
        ex.is_head = method == b"HEAD"
        target = ex.target
        self._check_line(method, target)
        if target[:1] != b"/":
            target = origin_form(ex, method, target)
        if not ex.host and not ex.http10:
            raise Reject(400, "Bad Request")

        headers = self._headers
        if self._conn_tokens is not None:
            headers = http.drop_nominated(headers, self._conn_tokens)
        ex.headers = headers
        te = self._te
        if te is not None:
            if ex.http10 or self._cl is not None:
                raise Reject(400, "Bad Request")
            codings = http.connection_tokens(te)
            if codings != [b"chunked"]:
                if b"chunked" in codings:
                    raise Reject(400, "Bad Request")
                raise Reject(501, "Not Implemented")
            ex.chunked = ex.has_body = True
            framing = b"Transfer-Encoding: chunked\r\n"
        elif self._cl is not None:
            ex.has_body = self._cl.strip(b"0") != b""
            framing = b"Content-Length: " + self._cl + CRLF
            max_body = self.ctx.max_body_size
            if max_body and int(self._cl) > max_body:
                raise Reject(413, "Content Too Large")
        else:
            framing = b""
        if (
            self._upgrade is not None
            and method == b"GET"
            and not ex.http10
            and b"upgrade" in (self._conn_tokens or ())
        ):
            # RFC 9110 §7.8: the one hop-by-hop pair poise passes on, so the backend can
            # agree to switch protocols (a WebSocket handshake); see tunnel.py.
            ex.upgrade = self._upgrade
            framing += b"Connection: Upgrade\r\nUpgrade: " + self._upgrade + CRLF
        # (find, not "in": bytes.__contains__ first tries its argument as an int and builds a
        # TypeError message before searching, which is most of its cost)
        if not target.isascii() or target.find(b"\\") >= 0 or target.find(b"#") >= 0:
            # Raw non-ASCII, backslashes and fragments are read differently by different
            # servers; what poise routes on must be what the backend sees (docs/http-rules.md).
            raise Reject(400, "Bad Request")

        host = ex.host
        ctx = self.ctx
        if ex.has_body:
            if ctx.retry_body_max and (
                method.decode() in http.IDEMPOTENT_METHODS
                or (ctx.idempotency_keys and http.has_field(headers, b"idempotency-key"))
            ):
                ex.kept = []  # a retry must send the body again: keep it (up to a bound)
            self.in_body = True
            self._head_raw = 0
            ex.body_started = now = ctx.clock()  # for limits.min_body_rate, checked by the sweep
            self.deadline = now + ctx.client_body_timeout
        else:
            self.deadline = _INF
        if self._fwd is not None or ctx.forwarded or ctx.via or not ctx.x_forwarded:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\n",
                 *forwarding_fields(ctx, ex, peer=self.peer, trusted=self.trusted, fwd=self._fwd,
                                   host=host, headers=headers, https=self.tls is not None),
                 self.tls_fields, framing, CRLF)
            )  # fmt: skip
        elif host:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\nHost: ", host, CRLF, *headers,
                 self.forwarded, b"X-Forwarded-Host: ", host, CRLF, framing, CRLF)
            )  # fmt: skip
        else:  # HTTP/1.0 without Host
            ex.head = b"".join((method, b" ", target, b" HTTP/1.1\r\n", *headers,
                                self.forwarded, framing, CRLF))  # fmt: skip
        ctx.stats.requests += 1
        self._head_raw = 0
        self.queue.append(ex)
        if len(self.queue) > 32:
            self._pause(_PAUSE_QUEUE)  # a pipelining client far ahead of its responses

    def _check_line(self, method: bytes, target: bytes) -> None:
        """The request line is ``method SP request-target SP HTTP-version`` with exactly one
        space each (RFC 9112 §3): llhttp skips extra spaces, so poise looks at the raw bytes.

        A request that began at the start of a read (nearly all: a keep-alive client sends
        one request per write) is checked exactly, by position. One pipelined behind another
        in the same read begins at an offset httptools does not report, so that read (with
        the rest of the head, if it spans reads) must hold no ``<method>  `` and no
        ``  HTTP/`` anywhere; the line is in it, so a doubled space is never missed, and a
        read found clean once is not searched again for the same method."""
        src = self._src
        more = self._more
        if more is not None:
            src = b"".join((src, *more))
        if self._known:
            i = 0
            if src[0] == 13 or src[0] == 10:  # empty lines before a request are skipped
                i = len(src) - len(src.lstrip(b"\r\n"))
            i += len(method)  # src[i] is the space after the method
            ok = src[i + 1] != 32 and src[i + 2 + len(target)] != 32
        elif src is self._clean and method == self._clean_method:
            ok = True
        else:
            ok = src.find(b"  HTTP/") < 0 and src.find(method + b"  ") < 0
            if ok:
                self._clean = src
                self._clean_method = method
        self._src = b""
        self._more = None
        if not ok:
            raise Reject(400, "Bad Request")

    def on_body(self, body: bytes) -> None:
        ex = self.cur
        assert ex is not None
        ctx = self.ctx
        self.deadline = ctx.clock() + ctx.client_body_timeout
        ex.body_bytes += len(body)
        if ctx.max_body_size and ex.body_bytes > ctx.max_body_size:
            raise Reject(413, "Content Too Large")
        if ex.response_done:
            return  # answered early (an error); the rest of the body is read and dropped
        if ex.chunked:
            pieces: tuple[bytes, ...] = (b"%x\r\n" % len(body), body, CRLF)
        else:
            pieces = (body,)
        kept = ex.kept
        if kept is not None:
            if ex.body_bytes <= ctx.retry_body_max:
                kept += pieces
            else:
                ex.kept = None  # too large to replay: this request is not retried
        up = ex.upstream
        if up is not None:
            up.send(pieces)
        else:
            ex.pending += pieces
            ex.pending_bytes += len(body)
            if ex.pending_bytes > QUEUE_BODY_LIMIT:
                self._pause(_PAUSE_QUEUE)

    def on_message_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        self.cur = None
        if self.in_body:
            self.in_body = False
            self.deadline = _INF
        ex.request_done = True
        if ex.chunked and not ex.response_done:
            if ex.kept is not None:
                ex.kept.append(b"0\r\n\r\n")
            if ex.upstream is not None:
                ex.upstream.send((b"0\r\n\r\n",))
            else:
                ex.pending += (b"0\r\n\r\n",)
        if ex.upstream is not None:
            ex.upstream.request_sent()
        elif ex.response_done:
            self._finish(ex)

    # -- exchange lifecycle ----------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
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
            self.ctx.stats.no_route += 1
            self.answer(ex, 404, "Not Found")
            return
        ex.group = group
        self.dispatch(ex, group)

    def dispatch(self, ex: Exchange, group: Group) -> None:
        """Send ``ex`` to the next usable backend it has not tried yet. ``group`` is read from
        the current routing table (health may have changed since the first attempt)."""
        up = group.up
        tried = ex.tried
        key = None
        if group.key is not None:
            key = keys.extract(group.key, ex.client or self.peer, ex.target, field_list(ex))
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
        idle = pool.idle
        conn = idle.pop() if idle else None  # Pool.take, inlined
        while conn is not None and conn.closed:
            conn = idle.pop() if idle else None
        if conn is None:
            self.ctx.spawn(attempts.connect(self, ex, backend))
            return
        pool.reuses += 1
        # attach, inlined for the common case (a pooled connection, no body held back)
        ex.upstream = conn
        if ex.pending:
            self.attach(ex, conn)
            return
        conn.start(ex, self, None)
        if self.write_paused:
            conn.pause_reading()

    def attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.upstream = conn
        pending = ex.pending
        ex.pending = ()
        if ex.pending_bytes:
            ex.pending_bytes = 0
            self._resume(_PAUSE_QUEUE)
        conn.start(ex, self, pending)
        if self.write_paused:
            conn.pause_reading()

    # -- what the upstream protocol reports (the decisions are in attempts.py) -------------

    def passive_failure(
        self, group: Group, backend: Backend, reason: str, *, connection: bool = True
    ) -> None:
        """A failure of ``backend`` for passive health (``attempts.passive_failure``)."""
        attempts.passive_failure(self.ctx, group, backend, reason, connection=connection)

    def may_retry(self, ex: Exchange, condition: str | int) -> bool:
        """Whether ``ex`` may go to another backend (``attempts.may_retry``)."""
        return attempts.may_retry(self, ex, condition)

    def retry(self, ex: Exchange) -> None:
        """Send ``ex`` again, to another backend (``attempts.retry``)."""
        attempts.retry(self, ex)

    def upstream_failed(self, ex: Exchange, condition: str, reusable_retry: bool) -> None:
        """The upstream connection of ``ex`` failed (``attempts.upstream_failed``)."""
        attempts.upstream_failed(self, ex, condition, reusable_retry)

    def response_complete(self, ex: Exchange) -> None:
        """The whole response of ``ex`` has been written to the transport."""
        ex.response_done = True
        ex.upstream = None
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
            # _finish, inlined for the common case: nothing queued behind, keep-alive
            queue = self.queue
            if (
                len(queue) == 1
                and ex.keep_alive
                and self.cur is None
                and not self.close_after
                and not ctx.draining
                and not self.upgrading
            ):
                queue.clear()
                self.deadline = now + ctx.client_idle_timeout
            else:
                self._finish(ex)
        else:
            # The backend answered before the request body ended (an early 413, say). The
            # rest of the body cannot go anywhere useful: end the connection after the write.
            self.close()

    def start_tunnel(self, up: UpstreamConnection, from_backend: bytes) -> None:
        """The backend answered the upgrade with 101: from now on both connections are one
        byte tunnel. Called by the upstream connection after it wrote the 101 head."""
        ctx = self.ctx
        self.upgrading = False
        for ex in self.queue:
            if ex.load is not None:
                settle(ex, ok=True)
            if ex.retrying:
                ex.retrying = False
                ctx.retries_active -= 1
        self.queue.clear()
        self.closed = True  # as an HTTP connection; the transport lives on in the tunnel
        ctx.clients.discard(self)
        up.detach()
        held, self.held = self.held, []
        assert self.transport is not None and up.transport is not None
        tunnel = Tunnel(ctx, self.transport, up.transport, ctx.tunnel_idle)
        tunnel.send(from_backend, b"".join(held))
        if ctx.draining:
            tunnel.close()

    def _finish(self, ex: Exchange) -> None:
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
        if self.upgrading:
            # The backend declined to switch protocols: back to HTTP, starting with what the
            # client sent after its upgrade request.
            self.upgrading = False
            self.parser = httptools.HttpRequestParser(self)
            held, self.held = self.held, []
            self._resume(_PAUSE_QUEUE)
            self.deadline = self.ctx.clock() + self.ctx.client_idle_timeout
            for data in held:
                self.data_received(data)
            return
        if queue:
            self._resume(_PAUSE_QUEUE)
            self._start(queue[0])
        elif self.cur is None:
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
            self._finish(ex)

    def _reject(self, status: int, message: str) -> None:
        """A request broke the rules: answer in order, then close; parse nothing more."""
        self.parser = None
        stats = self.ctx.stats
        stats.bad_requests += 1
        stats.rejects[status] = stats.rejects.get(status, 0) + 1
        self._pause(_PAUSE_QUEUE)
        cur = self.cur
        self.cur = None
        if cur is not None and cur in self.queue and cur.started:
            # Its head was fine but its body broke framing mid-way: the upstream has part of
            # a request, so that connection is abandoned.
            _abandon(cur, self.ctx)
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
            self._start(self.queue[0])

    # -- flow control, timeouts, closing ---------------------------------------------------

    def _pause(self, reason: int) -> None:
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
            self._pause(_PAUSE_UPSTREAM)
        else:
            self._resume(_PAUSE_UPSTREAM)

    def is_idle(self) -> bool:
        return not self.queue and self.cur is None

    def on_send_timeout(self) -> None:
        """The client stopped reading its response: nothing more can reach it."""
        self.send_deadline = _INF
        self.ctx.stats.client_timeouts += 1
        for ex in self.queue:
            _abandon(ex, self.ctx)
        if self.transport is not None and not self.closed:
            self.closed = True
            self.parser = None
            self.ctx.clients.discard(self)
            self.transport.abort()  # close() would wait for a flush that never comes

    def on_timeout(self) -> None:
        self.deadline = _INF
        if self.parser is None:  # lingering after an error: time is up
            self.close()
            return
        self.ctx.stats.client_timeouts += 1
        if self.in_body and self.queue and not self.queue[-1].response_started:
            # A request body that stopped arriving (slow POST): answer if nothing was sent.
            ex = self.queue[-1]
            _abandon(ex, self.ctx)
            if len(self.queue) == 1:
                assert self.transport is not None
                self.ctx.stats.client_408 += 1
                self.transport.write(
                    http.error_response(408, "Request Timeout", self.ctx.date.value, close=True)
                )
        elif self.cur is not None and not self.queue:
            # A request head that did not arrive in time (slowloris).
            assert self.transport is not None
            self.ctx.stats.client_408 += 1
            self.transport.write(
                http.error_response(408, "Request Timeout", self.ctx.date.value, close=True)
            )
        self.close()

    def _linger(self) -> None:
        """Close after an error without resetting the client: send FIN once the response is
        flushed and drop whatever the client still sends for a moment, so its kernel does not
        discard our response on an RST (nginx's lingering close)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.parser = None
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
            self.parser = None
            self.closed = True
            self.ctx.clients.discard(self)
            self.transport.close()

    def __repr__(self) -> str:
        return f"ClientConnection({self.peer.decode()}, queue={len(self.queue)})"


def _abandon(ex: Exchange, ctx: Context) -> None:
    """``ex`` will get no (more) response: drop its upstream connection, whose state is now
    unknown, and take it out of the load figures. The client went away or broke the rules,
    so nothing counts against the backend."""
    up = ex.upstream
    if up is not None:
        ex.upstream = None
        up.abandon()
    if ex.load is not None:
        settle(ex, ok=True)
    if ex.retrying:
        ex.retrying = False
        ctx.retries_active -= 1
