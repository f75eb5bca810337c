"""The backend side of the HTTP/1.1 proxy: one ``UpstreamConnection`` per backend socket.

Theory of operation
-------------------
A connection is *idle* (in its backend's pool) or *busy* with exactly one ``Exchange``. A
plain response head (l7/scan.py: a status from 200 to 499, a Content-Length) in the first read
takes one scan and its body is counted (``_replay``). Any other response is parsed by
httptools only to validate it and find where it ends; its head is
rebuilt (hop-by-hop and Connection-nominated fields dropped, framing re-declared, RFC 9110
§7.6.1) and body bytes are forwarded as they arrive, batched into one ``writelines`` per read.

Framing towards the client: a Content-Length body is forwarded as is; a chunked or
close-delimited body is re-chunked for HTTP/1.1 clients, and sent close-delimited to
HTTP/1.0 clients (which then lose keep-alive; RFC 9112 §7.1 forbids chunked to 1.0).

A connection goes back to the pool only when its state is beyond doubt: the response ended
by its own framing, the backend did not ask to close, the whole request was sent, and no byte
arrived beyond the response. Anything else (CL and TE together, a bad Content-Length, bytes
after a 204/304/HEAD response or a second response to one request, RFC 9112 §6.3) closes it;
if nothing was sent to the client yet, the client gets 502.

HEAD responses carry framing headers but no body, and llhttp cannot be told that (httptools
does not expose the "skip body" return), so for HEAD the parser is fed exactly the response
head(s) and then replaced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, cast

import httptools

from poise import failures
from poise.l7.request import settle, with_host
from poise.l7.response import (
    BODY_CHUNK,
    BODY_NONE,
    BODY_RAW,
    BODY_TUNNEL,
    COUNT_FROM,
    MEMO_MAX,
    MEMO_MISSES,
    BadResponse,
    ResponseMemo,
    content_length,
    framing,
    head_tail,
    rewrite_head,
    stray_bytes,
    upgrade_head,
)
from poise.l7.verdicts import judge_status

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection
    from poise.l7.context import Context
    from poise.l7.request import Exchange
    from poise.models import Backend
    from poise.upstream.pool import Pool

log = logging.getLogger("poise.proxy")

CRLF: Final = b"\r\n"
_INF: Final = float("inf")


class _RetryStatus(Exception):
    """Raised by on_headers_complete: the response is not forwarded, the request is retried."""


class _CountBody(Exception):
    """Raised by on_headers_complete to stop llhttp before a large Content-Length body."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_body_from", "_body_src", "_head_start", "_headbuf", "_low_head", "_memo", "_misses",
        "_received", "backend", "client", "close_delimited", "closed", "complete", "ctx",
        "deadline", "ex", "got_bytes", "head_done", "idle_since", "interim", "keep", "mode",
        "out", "parser", "pool", "remaining", "reused", "timeout", "total", "transport",
    )  # fmt: skip

    def __init__(
        self,
        ctx: Context,
        pool: Pool[UpstreamConnection],
        backend: Backend,
        timeout: float | None = None,
        total: float | None = None,
    ) -> None:
        self.ctx = ctx
        # the response timeout of one try (retry.per_try_timeout, else timeouts.upstream_response)
        self.timeout = ctx.upstream_response_timeout if timeout is None else timeout
        # all tries of a request together (retry.timeout, else timeouts.upstream_response):
        # counted from the first try, which may be this connection's (Exchange.until)
        self.total = ctx.upstream_response_timeout if total is None else total
        self.pool = pool
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.client: ClientConnection | None = None
        self.deadline = _INF
        self.idle_since = 0.0
        self.closed = False
        self.reused = False
        self.out: list[bytes | memoryview] = []
        self._memo: ResponseMemo | None = None  # the last plain response head, see _replay
        self._misses = 0  # responses since the last one that was _memo's (see MEMO_MISSES)
        self._reset()

    def _reset(self) -> None:
        self._body_src = b""
        self._body_from = 0
        self._low_head = b""
        self._received = 0
        self.remaining = -1  # Content-Length body bytes still to forward; -1: not counting
        self._headbuf = b""
        self._head_start = 0
        self.complete = False
        self.head_done = False
        self.interim = False
        self.got_bytes = False
        self.keep = False
        self.close_delimited = False
        self.mode = BODY_NONE

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=256 * 1024)
        self.pool.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.open -= 1
        self.pool.discard(self)
        ex = self.ex
        if ex is None:
            return
        client = self.client
        self.ex = self.client = None
        assert client is not None
        if self.close_delimited and self.head_done:
            # EOF is how this response ends (RFC 9112 §6.3 item 8).
            if self.mode == BODY_CHUNK:
                client.forward([b"0\r\n\r\n"])
            client.response_complete(ex)
            return
        # Died mid-exchange. A reused idle connection that never produced a byte was most
        # likely closed by the backend's keep-alive timer just as we sent: safe to replay.
        failure = failures.BROKEN if self.got_bytes else failures.RESET
        client.upstream_failed(ex, failure, self.reused and not self.got_bytes)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(False)

    # One of the two protocol callbacks that parse (issue #19 allows them their branches):
    # each branch is a way a read of a response can go, and a call per branch would run per
    # request on the compiled hot path.
    def data_received(self, data: bytes) -> None:  # noqa: PLR0912, PLR0915
        ex = self.ex
        if ex is None:
            # Bytes from an idle backend belong to no request; the connection is unusable.
            self.close()
            return
        first = not self.got_bytes  # the first read of this response
        self.got_bytes = True
        out: list[bytes | memoryview] = []
        self.out = out
        client = self.client
        assert client is not None
        stray = False
        memo = self._memo
        replay = False
        if first and memo is not None:
            replay = memo.fits(data, ex)
            self._misses = 0 if replay else self._misses + 1
        counting = self.remaining >= 0
        try:
            if counting:
                pass  # a Content-Length body being counted: see _count
            elif replay:
                assert memo is not None
                stray = self._replay(
                    ex, client, data, out, status=memo.status, rewritten=memo.rewritten,
                    length=memo.length, start=len(memo.head), keep=True,
                )  # fmt: skip
            elif (
                first
                and not ex.is_head
                and (got := self.ctx.scan_response(data)) is not None
                and ex.group is not None
                and got[0] not in ex.group.retry_statuses
            ):
                # a plain response head (l7/scan.py): what on_headers_complete would make
                # of it, without httptools; the body is counted
                status, rewritten, length, end, keep = got
                stray = self._replay(
                    ex, client, data, out, status=status, rewritten=rewritten, length=length,
                    start=end, keep=keep,
                )  # fmt: skip
                if keep and end < MEMO_MAX and self._misses < MEMO_MISSES:
                    self._memo = ResponseMemo(data[:end], status, rewritten, length)
            elif not self.head_done:
                # The head is processed from raw bytes (see on_headers_complete): keep them
                # until it is complete. Usually the whole head is in the first read.
                if self._headbuf:
                    self._headbuf = self._headbuf[self._head_start :] + data
                    self._head_start = 0
                else:
                    self._headbuf = data
                if ex.is_head:
                    stray = self._feed_head_only()
                else:
                    self.parser.feed_data(data)
            else:
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.mode != BODY_TUNNEL:
                self._broken(ex, client, out, BadResponse("unexpected protocol switch"))
                return
            # 101 Switching Protocols: what follows its head is the new protocol's.
            rest = data[int(exc.args[0]) :]  # the offset is into what was just fed
            if out:
                client.forward(out)
            self.ex = self.client = None
            client.start_tunnel(self, rest)
            return
        except (httptools.HttpParserError, BadResponse) as exc:
            if isinstance(exc.__context__, _RetryStatus):
                # A status the group retries (retry.on): the response is dropped unread,
                # with its connection, and the request goes to another backend.
                self.ex = self.client = None
                self.close()
                if ex.load is not None:
                    settle(ex, ok=False)
                client.retry(ex)
                return
            if not isinstance(exc.__context__, _CountBody):
                self._broken(ex, client, out, exc)
                return
            # on_headers_complete stopped llhttp before a large Content-Length body: forward
            # the rest of this read as a view (no copy) and count from here on.
            self.parser = httptools.HttpResponseParser(self)
            body = memoryview(self._body_src)[self._body_from :]
            self._body_src = b""
            stray = self._count(body, out)
        else:
            if counting:
                stray = self._count(data, out)
        if out:
            if self.complete and not ex.keep_alive:
                client.forward_last(out)  # the connection closes after it
            else:
                client.forward(out)
        if self.complete:
            self._release(ex, client, reusable=self.keep and not stray)
            return
        # The response goes on: the backend may be silent for a try's time from now. Not
        # when the client is not keeping up (pause_reading, perhaps just now in _send):
        # then the silence is ours, not the backend's.
        if not client.write_paused:
            self.deadline = self.ctx.clock() + self.timeout
        if self.mode == BODY_RAW and self.remaining < 0 and self.head_done and self._low_head:
            # A Content-Length body longer than one read: count the rest instead of feeding
            # llhttp, which would copy every chunk into a new bytes object for on_body.
            self.remaining = content_length(self._low_head) - self._received
            self.parser = httptools.HttpResponseParser(self)  # the old one expects the body

    def _replay(
        self,
        ex: Exchange,
        client: ClientConnection,
        data: bytes,
        out: list[bytes | memoryview],
        *,
        status: int,
        rewritten: bytes,
        length: int,
        start: int,
        keep: bool,
    ) -> bool:
        """``data`` starts with a plain response head (``start`` bytes) that was remembered
        (a ResponseMemo) or scanned (l7/scan.py): ``status``, the ``rewritten`` head without
        what poise adds per request, the Content-Length. What on_headers_complete would make
        of it, without parsing it; the body is counted. True when bytes beyond the body
        arrived."""
        ex.status = status
        self.pool.responses[status // 100] += 1
        group = ex.group
        assert group is not None
        o = group.outliers
        if o is not None and o.any_streak:  # (not a retried status: see the caller)
            judge_status(
                self.ctx, ex, self.backend, status, b"", forwarded=True, client_closed=False
            )
        if self.ctx.access is not None:
            ex.body_out = length
        self.mode = BODY_RAW
        out.append(rewritten + head_tail(self.ctx, self.backend, ex, client, b""))
        self.keep = keep
        self.head_done = True
        ex.response_started = True
        if length == 0:
            self.complete = True
            return len(data) > start and stray_bytes(data[start:])
        self.remaining = length
        n = len(data) - start
        if n == 0:
            return False
        return self._count(data[start:] if n < COUNT_FROM else memoryview(data)[start:], out)

    def _count(self, data: bytes | memoryview, out: list[bytes | memoryview]) -> bool:
        """Forward counted body bytes; True when bytes beyond the body arrived."""
        n = len(data)
        if n < self.remaining:
            out.append(data)
            self.remaining -= n
            return False
        out.append(data if n == self.remaining else data[: self.remaining])
        stray = n > self.remaining and stray_bytes(data[self.remaining :])
        self.remaining = -1
        self.complete = True
        return stray

    def _feed_head_only(self) -> bool:
        """Feed a HEAD response's head(s) and nothing after; True when bytes follow it."""
        buf = self._headbuf
        fed = self._head_start
        while not self.complete:
            end = buf.find(b"\r\n\r\n", fed)
            if end < 0:
                if fed:
                    self.parser.feed_data(buf[self._head_start : fed])
                return False
            fed = end + 4
            self.parser.feed_data(buf[self._head_start : fed])
            if self.head_done:
                self.complete = True
        # llhttp now expects the body announced by Content-Length: start afresh.
        self.parser = httptools.HttpResponseParser(self)
        return len(buf) > fed

    # -- parser callbacks (only these three: per-header callbacks cost more than the
    # -- regex pass over the raw head in on_headers_complete) -------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise BadResponse("bytes after the end of the response")

    def on_headers_complete(self) -> None:
        ex = self.ex
        client = self.client
        assert ex is not None and client is not None
        # llhttp has validated the head (strict CRLF, token and value syntax, one valid
        # Content-Length, not both CL and TE), so the raw bytes are rewritten, not re-parsed.
        buf = self._headbuf
        start = self._head_start
        end = buf.find(b"\r\n\r\n", start)
        self._head_start = end + 4
        eol = buf.find(b"\r\n", start)
        line, block, low, has_cl, te = rewrite_head(buf, start, eol, end)
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                if ex.upgrade is None:
                    raise BadResponse("101 without an upgrade request")
                self.out.append(upgrade_head(line, block, low, buf[eol:end]))
                self.mode = BODY_TUNNEL
                self.head_done = True
                ex.response_started = True
                return
            # 1xx interim responses (100 Continue, 103 Early Hints) are forwarded to
            # HTTP/1.1 clients; the final response follows on the same parser.
            if not ex.http10:
                self.out.append(line + block + b"\r\n\r\n")
            self.interim = True
            return
        ex.status = status
        self.pool.responses[status // 100 if status < 600 else 5] += 1
        group = ex.group
        assert group is not None
        if (
            (status >= 500 or (group.outliers is not None and group.outliers.any_streak))
            and judge_status(
                self.ctx, ex, self.backend, status, low,
                forwarded=bool(self.out), client_closed=client.closed,
            )
        ):  # fmt: skip
            raise _RetryStatus
        no_body = ex.is_head or status in (204, 304)
        if has_cl and self.ctx.access is not None:
            ex.body_out = content_length(low)
        self.mode, tail, self.close_delimited = framing(ex, has_cl, te, no_body=no_body)
        # Content-Length is read from the head only if the body is long
        self._low_head = low if has_cl or no_body else b""
        rewritten = line + block
        self.out.append(rewritten + head_tail(self.ctx, self.backend, ex, client, tail))
        self.keep = keep = self.parser.should_keep_alive()
        self.head_done = True
        ex.response_started = True
        self._headbuf = b""  # do not pin a large first read for the whole response
        if (
            keep
            and has_cl
            and self.mode == BODY_RAW
            and status < 500
            and not ex.is_head
            and end - start < MEMO_MAX
            and self._misses < MEMO_MISSES
        ):
            length = ex.body_out if ex.body_out is not None else content_length(low)
            self._memo = ResponseMemo(buf[start : end + 4], status, rewritten, length)
        if self.mode == BODY_RAW and len(buf) - end > COUNT_FROM:
            # Much body follows in this very read: stop llhttp here so it does not copy it
            # into a new bytes object for on_body (data_received continues from end + 4).
            self.remaining = content_length(low)
            self._body_src = buf
            self._body_from = end + 4
            raise _CountBody

    def on_body(self, body: bytes) -> None:
        mode = self.mode
        if mode == BODY_RAW:
            self.out.append(body)
            self._received += len(body)
        elif mode == BODY_CHUNK:
            self.out += (b"%x\r\n" % len(body), body, CRLF)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.mode == BODY_CHUNK:
            self.out.append(b"0\r\n\r\n")
        self.complete = True

    # -- exchange lifecycle (called by ClientConnection) -----------------------------------

    def start(self, ex: Exchange, client: ClientConnection, body: tuple[bytes, ...] | None) -> None:
        self.ex = ex
        self.client = client
        # per-response state (see _reset), inlined: this runs once per request
        self._headbuf = b""
        self._head_start = 0
        self.complete = self.head_done = self.interim = self.got_bytes = self.keep = False
        self.close_delimited = False
        self.mode = BODY_NONE
        self._received = 0
        transport = self.transport
        assert transport is not None
        head = ex.head if ex.host else with_host(ex.head, self.backend)
        if body:
            transport.writelines((head, *body))
        else:
            transport.write(head)
        if ex.request_done:
            self._arm(ex)
        else:
            self.deadline = _INF

    def send(self, pieces: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(pieces)

    def request_sent(self) -> None:
        if self.ex is not None:
            self._arm(self.ex)

    def _arm(self, ex: Exchange) -> None:
        """The request is all sent: wait for the response, a try's time but never past the
        request's total (retry.timeout, counted from its first try)."""
        now = self.ctx.clock()
        until = ex.until
        if not until:
            until = ex.until = now + self.total
        deadline = now + self.timeout
        self.deadline = deadline if deadline < until else until

    def pause_reading(self) -> None:
        """The client is not keeping up: stop reading, and stop blaming the backend for the
        silence (the client side has timeouts.client_send for that)."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self.deadline = _INF

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self.ex is not None:
                self.deadline = self.ctx.clock() + self.timeout

    def usable(self) -> bool:
        return not self.closed

    def detach(self) -> None:
        """The connection now belongs to a tunnel: it leaves the pool's accounting."""
        self.ex = self.client = None
        self.closed = True  # for the pool: never to be reused
        self.pool.open -= 1

    def abandon(self) -> None:
        """The client is gone or its request broke mid-way: this connection's state is unknown."""
        self.ex = self.client = None
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.pool.discard(self)
            self.transport.close()

    def on_timeout(self) -> None:
        ex, client = self.ex, self.client
        self.deadline = _INF
        if ex is None or client is None:
            return
        self.ex = self.client = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
        client.upstream_failed(ex, failures.TIMEOUT, False)

    def _release(self, ex: Exchange, client: ClientConnection, *, reusable: bool) -> None:
        self.ex = self.client = None
        ctx = self.ctx
        self.deadline = _INF
        if (
            reusable
            and ex.request_done
            and not self.close_delimited
            and not ctx.draining
            and self.pool.put(self, ctx.now)
        ):
            self.reused = True
            if client.write_paused:
                self.resume_reading()  # an idle connection must notice the backend closing
        else:
            self.close()
        if not client.closed:
            client.response_complete(ex)

    def _broken(
        self, ex: Exchange, client: ClientConnection, out: list[bytes | memoryview], exc: Exception
    ) -> None:
        log.warning("backend %s sent a malformed response: %s", self.backend.authority, exc)
        self.ex = self.client = None
        self.close()
        if self.complete:
            # The response itself was whole; what followed it was not ours to forward.
            if out:
                client.forward(out)
            client.response_complete(ex)
        else:
            client.upstream_failed(ex, failures.BROKEN, False)

    def __repr__(self) -> str:
        state = "busy" if self.ex is not None else "idle"
        return f"UpstreamConnection({self.backend.authority}, {state})"
