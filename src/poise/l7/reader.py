"""The request half of a client connection: the client's bytes in, ``Exchange`` records out.

Theory of operation
-------------------
``ClientConnection.data_received`` hands every read to ``RequestReader.feed``, which turns
it into requests on the client's queue, by the cheapest way that gives the same result:

1. the same bytes as the last plain head remembered on this connection (or, on a new
   connection, from the same listener, address and client certificate): what poise made of
   them then (l7/memo.py, ``_repeat``);
2. one whole plain head (l7/scan.py, in C when built): one scan (``_plain``);
3. anything else: httptools (llhttp), which calls back per event (``on_message_begin`` ...
   ``on_message_complete``); the callbacks check what llhttp leaves to poise and rebuild the
   head (docs/http-rules.md). A request that breaks a rule is refused by the client
   (``ClientConnection.reject``), which answers in order and reads nothing more.

Request bodies go to the exchange's upstream connection as they arrive (``on_body``), or
are held until it has one. The reader keeps the parser and ``state``: READING, or why nothing more
is parsed (UPGRADING: waiting for the backend's answer to an upgrade; HALF_CLOSED; REFUSED:
lingering after an error; CLOSED); the client keeps the queue, flow control and timeouts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import httptools

from poise.l7 import http
from poise.l7.memo import MEMO_MISSES, RequestMemo, recall, remember
from poise.l7.request import (
    Exchange,
    Reject,
    field_list,
    forwarding_fields,
    origin_form,
    request_ended,
)
from poise.l7.scan import RequestScan

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection
    from poise.l7.context import Context

log = logging.getLogger("poise.proxy")

CRLF: Final = b"\r\n"
EOH: Final = b"\r\n\r\n"  # the end of a head
# what the reader does with the client's bytes (RequestReader.state)
READING: Final = 0  # parse them into requests
UPGRADING: Final = 1  # hold them (the client does): the backend decides whether an upgrade is
# happening (101) or not (the bytes are then the next request)
HALF_CLOSED: Final = 2  # none come: the client shut its sending side; it still gets responses
REFUSED: Final = 3  # drop them: a request broke the rules (answered, then a lingering close)
CLOSED: Final = 4  # drop them: closing, closed, or a tunnel has the transport
NAMES_MAX: Final = 512  # distinct field-name spellings whose kind Context.name_kinds keeps
QUEUE_BODY_LIMIT: Final = 1 << 20  # body bytes held for not-yet-started pipelined requests
_INF: Final = float("inf")
_HOSTS_SEEN: set[bytes] = set()  # Host values already validated (bounded)
# a reason the client pauses reading (ClientConnection.pause): too much is held for queued
# requests
PAUSE_QUEUE: Final = 2


class RequestReader:
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
        "_left",
        "_more",
        "_n_headers",
        "_names",
        "_src",
        "_te",
        "_upgrade",
        "client",
        "ctx",
        "cur",
        "in_body",
        "memo",
        "misses",
        "parser",
        "state",
    )

    def __init__(self, client: ClientConnection, ctx: Context) -> None:
        # the connection; None once it is lost (ClientConnection.connection_lost), so that
        # the two do not keep each other alive
        self.client: ClientConnection | None = client
        self.ctx = ctx
        self._kinds = ctx.header_kinds
        self._names = ctx.name_kinds  # the same by the names' spelling (a cache)
        self.state = READING
        # llhttp, made by the first read that needs it: a plain head takes the scan, and a
        # connection whose requests all do never makes one (None again once the connection is
        # gone: the parser and the reader refer to each other)
        self.parser: httptools.HttpRequestParser | None = None
        self.cur: Exchange | None = None  # the request being read
        self.in_body = False
        self._headers: list[bytes] = []
        self._n_headers = 0
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._conn_tokens: list[bytes] | None = None
        self._fwd: list[tuple[bytes, bytes, bytes]] | None = None  # client X-Forwarded-*, ...
        self._upgrade: bytes | None = None
        self._head_size = 0  # bytes of the current request head, as parsed
        self._head_raw = 0  # bytes received while not in a body (a guard, see feed)
        self._left = 0  # body bytes of a scanned request still to come (_count_body)
        self.memo: RequestMemo | None = None  # the last bodiless request head (l7/memo.py)
        self.misses = 0  # heads since the last one that was memo's (memo.MEMO_MISSES)
        self._begun = 0  # requests whose parsing began (on_message_begin)
        # a remembered request without keep-alive was taken (_repeat): the parser, which did
        # not see it, must act as llhttp does after one (see feed)
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

    def restart(self) -> None:
        """Parse what comes next as a new HTTP/1.1 stream (a declined upgrade)."""
        self.parser = httptools.HttpRequestParser(self)
        self.state = READING

    # One of the two protocol callbacks that parse (issue #19 allows them their branches):
    # each branch is a way a read can go, and a call per branch would run per request on the
    # compiled hot path.
    def feed(self, data: bytes) -> None:  # noqa: PLR0912
        client = self.client
        assert client is not None  # (None once the connection is gone)
        if self.cur is None and (self.memo is not None or self._begun == 0):
            memo = recall(self, data, self.ctx, client, self.state == READING)
            if memo is not None:
                self._repeat(memo)
                return
        if self.state != READING:  # (see ClientConnection.data_received)
            return
        if self._left:  # the body of a scanned request (_plain)
            self._count_body(client, data)
            return
        if self.cur is None and not self._after_close:
            # between requests: a plain head in one read takes one scan (l7/scan.py);
            # anything else is parsed below, which decides everything scan_request leaves
            ctx = self.ctx
            got = ctx.scan_request(
                data, ctx.max_target, ctx.max_headers, ctx.max_header_bytes, ctx.max_body_size,
                ctx.dropped_fields,
            )  # fmt: skip
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
                client.reject(431, "Request Header Fields Too Large")
                return
        begun = self._begun
        try:
            if self._after_close:
                # llhttp after a request without keep-alive: CR and LF are skipped, anything
                # else is an error
                if data.strip(b"\r\n"):
                    raise httptools.HttpParserError("Data after `Connection: close`")
            else:
                parser = self.parser
                if parser is None:
                    parser = self.parser = httptools.HttpRequestParser(self)
                parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            reason = exc.__context__
            if isinstance(reason, Reject):
                client.reject(reason.status, reason.message)
            else:
                log.error("internal error parsing a request", exc_info=reason)
                client.reject(500, "Internal Server Error")
        except httptools.HttpParserUpgrade as exc:
            rest = data[int(exc.args[0]) :]
            if client.queue and client.queue[-1].upgrade is not None:
                # What follows belongs to the new protocol if the backend agrees (101), or
                # is the next HTTP request if it does not: hold it until we know.
                self.state = UPGRADING
                client.held = [rest] if rest else []
            else:
                # An upgrade poise did not forward (not a GET, say): the backend answers
                # plain HTTP, so what follows is parsed as HTTP.
                self.parser = httptools.HttpRequestParser(self)
                if rest:
                    client.data_received(rest)
                    return
        except httptools.HttpParserError:
            client.reject(400, "Bad Request")
        else:
            if (
                fresh
                and self._begun == begun + 1
                and self.cur is None
                and self.misses < MEMO_MISSES
                and self.state == READING
            ):
                remember(self, data, self.ctx, client)
        self._feed = b""  # (not kept: it may be a large piece of a body)
        self._clean = None

    def _repeat(self, memo: RequestMemo) -> None:
        """The same bodiless request head as before, in one read: what the parser callbacks
        would do for it, without parsing and rebuilding it again."""
        client = self.client
        assert client is not None  # (None once the connection is gone)
        ex = memo.exchange()
        ex.t0 = self.ctx.clock()
        if not ex.keep_alive:
            self._after_close = True
        self._enqueue(ex)
        queue = client.queue
        if not queue[0].started and not client.closed:
            client.start(queue[0])

    def _enqueue(self, ex: Exchange) -> None:
        """A whole bodiless request (remembered or scanned): counted and queued."""
        client = self.client
        assert client is not None  # (None once the connection is gone)
        self.ctx.stats.requests += 1
        client.deadline = _INF
        queue = client.queue
        queue.append(ex)
        if len(queue) > 32:
            client.pause(PAUSE_QUEUE)  # a pipelining client far ahead of its responses

    def _plain(self, data: bytes, got: RequestScan) -> None:
        """A plain request head, scanned (l7/scan.py): what the parser callbacks would make
        of it. HTTP/1.1 in origin form with a valid Host; its body, if it has one, is framed
        by Content-Length and counted here (_count_body), without httptools."""
        client = self.client
        assert client is not None  # (None once the connection is gone)
        method, target, host, fields, keep_alive, length, end = got
        ctx = self.ctx
        ex = Exchange()
        ex.t0 = ctx.clock()
        ex.method = method
        ex.target = target
        ex.host = host
        ex.fields = fields
        ex.is_head = method == b"HEAD"
        if not keep_alive:
            ex.keep_alive = False
            self._after_close = True
        framing = b""
        if length is not None:
            framing = b"Content-Length: " + length + CRLF
            ex.has_body = length.strip(b"0") != b""
        if ctx.plain_forwarding:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\nHost: ", host, CRLF, fields,
                 client.forwarded, b"X-Forwarded-Host: ", host, CRLF, framing, CRLF)
            )  # fmt: skip
        else:
            ex.head = _general_head(
                client, ex, target, host, field_list(ex), fwd=None, framing=framing
            )
        self._begun += 1
        if ex.has_body:
            self.cur = ex
            self._left = int(length or b"0")
            self._body_begins(client, ex)
            ctx.stats.requests += 1
            client.queue.append(ex)
            if len(client.queue) > 32:
                client.pause(PAUSE_QUEUE)  # a pipelining client far ahead of its responses
            if len(data) > end:
                self._count_body(client, data[end:])
            return  # (the client starts it: ClientConnection.data_received)
        ex.request_done = True
        self._enqueue(ex)
        if self.misses < MEMO_MISSES and self.state == READING:
            remember(self, data, self.ctx, client)
        queue = client.queue
        if not queue[0].started and not client.closed:
            client.start(queue[0])

    def _body_begins(self, client: ClientConnection, ex: Exchange) -> None:
        """The head of ``ex`` announced a body: keep it for a retry if one may be needed,
        and time its arrival."""
        ctx = self.ctx
        if ctx.retry_body_max and (
            ex.method.decode() in http.IDEMPOTENT_METHODS
            or (ctx.idempotency_keys and http.has_field(field_list(ex), b"idempotency-key"))
        ):
            ex.kept = []  # a retry must send the body again: keep it (up to a bound)
        self.in_body = True
        self._head_raw = 0
        ex.body_started = now = ctx.clock()  # for limits.min_body_rate, checked by the sweep
        client.deadline = now + ctx.client_body_timeout

    def _count_body(self, client: ClientConnection, data: bytes) -> None:
        """Body bytes of a scanned request (``_left`` more to come): what llhttp would call
        on_body and on_message_complete with; bytes after the body are read as they would
        be after a parsed one."""
        left = self._left
        body = data if len(data) <= left else data[:left]
        self._left = left - len(body)
        try:
            self.on_body(body)
        except Reject as exc:
            self._left = 0
            client.reject(exc.status, exc.message)
            return
        if not self._left:
            self.on_message_complete()
            if len(data) > left and self.state == READING:
                self.feed(data[left:])

    def on_message_begin(self) -> None:
        client = self.client
        assert client is not None  # (None once the connection is gone)
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
        if not client.queue:
            client.deadline = now + self.ctx.client_header_timeout

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
        kind = self._names.get(name)
        if kind is None:
            kind = _field_kind(self._kinds, self._names, name)
        if kind == http.PLAIN:
            self._headers += (name, b": ", value, CRLF)
            return
        ex = self.cur
        assert ex is not None
        if kind == http.HOST:
            if ex.host or not (value in _HOSTS_SEEN or _valid_host(value)):
                raise Reject(400, "Bad Request")
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

    def on_headers_complete(self) -> None:
        client = self.client
        assert client is not None  # (None once the connection is gone)
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
        framing = _framing(
            ex, self._te, self._cl, self._upgrade, tokens=tokens, max_body=self.ctx.max_body_size
        )
        # (find, not "in": bytes.__contains__ first tries its argument as an int and builds a
        # TypeError message before searching, which is most of its cost)
        if not target.isascii() or target.find(b"\\") >= 0 or target.find(b"#") >= 0:
            # Raw non-ASCII, backslashes and fragments are read differently by different
            # servers; what poise routes on must be what the backend sees (docs/http-rules.md).
            raise Reject(400, "Bad Request")

        host = ex.host
        ctx = self.ctx
        if ex.has_body:
            self._body_begins(client, ex)
        else:
            client.deadline = _INF
        if self._fwd is not None or not ctx.plain_forwarding:
            ex.head = _general_head(
                client, ex, target, host, headers, fwd=self._fwd, framing=framing
            )
        elif host:
            ex.head = b"".join(
                (method, b" ", target, b" HTTP/1.1\r\nHost: ", host, CRLF, *headers,
                 client.forwarded, b"X-Forwarded-Host: ", host, CRLF, framing, CRLF)
            )  # fmt: skip
        else:  # HTTP/1.0 without Host
            ex.head = b"".join((method, b" ", target, b" HTTP/1.1\r\n", *headers,
                                client.forwarded, framing, CRLF))  # fmt: skip
        ctx.stats.requests += 1
        self._head_raw = 0
        client.queue.append(ex)
        if len(client.queue) > 32:
            client.pause(PAUSE_QUEUE)  # a pipelining client far ahead of its responses

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
        self._src = b""
        self._more = None
        if self._known:
            ok = _single_spaces(src, method, target)
        elif src is self._clean and method == self._clean_method:
            ok = True
        else:
            ok = src.find(b"  HTTP/") < 0 and src.find(method + b"  ") < 0
            if ok:
                self._clean = src
                self._clean_method = method
        if not ok:
            raise Reject(400, "Bad Request")

    def on_body(self, body: bytes) -> None:
        client = self.client
        assert client is not None  # (None once the connection is gone)
        ex = self.cur
        assert ex is not None
        ctx = self.ctx
        client.deadline = ctx.clock() + ctx.client_body_timeout
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
        conn = ex.conn
        if conn is not None:
            conn.send(pieces)
        else:
            ex.pending += pieces
            ex.pending_bytes += len(body)
            if ex.pending_bytes > QUEUE_BODY_LIMIT:
                client.pause(PAUSE_QUEUE)

    def on_message_complete(self) -> None:
        client = self.client
        assert client is not None  # (None once the connection is gone)
        ex = self.cur
        assert ex is not None
        self.cur = None
        if self.in_body:
            self.in_body = False
            client.deadline = _INF
        if not request_ended(ex) and ex.response_done:
            client.finish(ex)


def _framing(
    ex: Exchange,
    te: bytes | None,
    cl: bytes | None,
    upgrade: bytes | None,
    *,
    tokens: list[bytes] | None,
    max_body: int,
) -> bytes:
    """The framing fields poise declares for the request ``ex`` (RFC 9112 §6), from its
    Transfer-Encoding, Content-Length, Upgrade and Connection tokens; sets ``ex.chunked``,
    ``has_body`` and ``upgrade``. Raises Reject for what must not be forwarded."""
    if te is not None:
        if ex.http10 or cl is not None:
            raise Reject(400, "Bad Request")
        codings = http.connection_tokens(te)
        if codings != [b"chunked"]:
            if b"chunked" in codings:
                raise Reject(400, "Bad Request")
            raise Reject(501, "Not Implemented")
        ex.chunked = ex.has_body = True
        framing = b"Transfer-Encoding: chunked\r\n"
    elif cl is not None:
        ex.has_body = cl.strip(b"0") != b""
        framing = b"Content-Length: " + cl + CRLF
        if max_body and int(cl) > max_body:
            raise Reject(413, "Content Too Large")
    else:
        framing = b""
    if (
        upgrade is not None
        and ex.method == b"GET"
        and not ex.http10
        and b"upgrade" in (tokens or ())
    ):
        # RFC 9110 §7.8: the one hop-by-hop pair poise passes on, so the backend can agree
        # to switch protocols (a WebSocket handshake); see tunnel.py.
        ex.upgrade = upgrade
        framing += b"Connection: Upgrade\r\nUpgrade: " + upgrade + CRLF
    return framing


def _single_spaces(src: bytes, method: bytes, target: bytes) -> bool:
    """``src`` begins with the request line of ``method`` and ``target`` (after any empty
    lines): one space after the method and one after the target."""
    i = 0
    if src[0] == 13 or src[0] == 10:  # empty lines before a request are skipped
        i = len(src) - len(src.lstrip(b"\r\n"))
    i += len(method)  # src[i] is the space after the method
    return src[i + 1] != 32 and src[i + 2 + len(target)] != 32


def _general_head(
    client: ClientConnection,
    ex: Exchange,
    target: bytes,
    host: bytes,
    headers: list[bytes],
    *,
    fwd: list[tuple[bytes, bytes, bytes]] | None,
    framing: bytes,
) -> bytes:
    """The head to forward when the forwarding fields are more than the usual three (a
    trusted proxy's, Forwarded, Via, or X-Forwarded-* left alone): see forwarding_fields."""
    fields = forwarding_fields(
        client.ctx, ex, peer=client.peer, trusted=client.trusted, fwd=fwd, host=host,
        headers=headers, https=client.tls is not None,
    )  # fmt: skip
    return b"".join(
        (ex.method, b" ", target, b" HTTP/1.1\r\n", *fields, client.tls_fields, framing, CRLF)
    )


def _valid_host(value: bytes) -> bool:
    """Whether ``value`` is a valid Host; valid ones are remembered (``_HOSTS_SEEN``,
    bounded), so the regex runs once per distinct Host value."""
    if not http.HOST_RE.fullmatch(value):
        return False
    if len(_HOSTS_SEEN) < 4096:
        _HOSTS_SEEN.add(value)
    return True


def _field_kind(kinds: dict[bytes, int], names: dict[bytes, int], name: bytes) -> int:
    """What poise does with a field of this name (``kinds``: http.REQUEST_HEADER_KIND by
    lower-case name), remembered per spelling in ``names`` (Context.name_kinds, bounded)."""
    kind = kinds.get(name.lower(), http.PLAIN)
    if kind == http.PLAIN and name.find(b"_") >= 0:
        # Dropped, as nginx does (underscores_in_headers off): some frameworks read
        # "_" as "-", so "Transfer_Encoding" would become framing behind the proxy.
        kind = http.HOP
    if len(names) < NAMES_MAX and len(name) <= 64:
        names[name] = kind
    return kind
