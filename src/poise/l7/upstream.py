"""The backend side of the HTTP/1.1 proxy: one ``UpstreamConnection`` per backend socket.

Theory of operation
-------------------
A connection is *idle* (in its backend's pool) or *busy* with exactly one ``Exchange``. The
response is parsed by httptools only to validate it and find where it ends; its head is
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
from typing import TYPE_CHECKING, cast

import httptools

from poise.l7 import http

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection, Exchange
    from poise.l7.context import Context
    from poise.models import Backend
    from poise.upstream.pool import Pool

log = logging.getLogger("poise.proxy")

CRLF = b"\r\n"
_INF = float("inf")

# how a response body travels to the client
_NONE = 0
_RAW = 1  # bytes as they are (Content-Length, or close-delimited to an HTTP/1.0 client)
_CHUNK = 2  # re-chunked


class BadResponse(Exception):
    """Raised inside a parser callback: the backend broke HTTP/1.1."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_head_start",
        "_headbuf",
        "backend",
        "client",
        "close_delimited",
        "closed",
        "complete",
        "ctx",
        "deadline",
        "ex",
        "got_bytes",
        "head_done",
        "idle_since",
        "interim",
        "keep",
        "mode",
        "out",
        "parser",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, ctx: Context, pool: Pool[UpstreamConnection], backend: Backend) -> None:
        self.ctx = ctx
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
        self.out: list[bytes] = []
        self._reset()

    def _reset(self) -> None:
        self._headbuf = b""
        self._head_start = 0
        self.complete = False
        self.head_done = False
        self.interim = False
        self.got_bytes = False
        self.keep = False
        self.close_delimited = False
        self.mode = _NONE

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
        self.ctx.upstreams.discard(self)
        client = self.client
        self.ex = self.client = None
        assert client is not None
        if self.close_delimited and self.head_done:
            # EOF is how this response ends (RFC 9112 §6.3 item 8).
            if self.mode == _CHUNK and not client.closed:
                assert client.transport is not None
                client.transport.write(b"0\r\n\r\n")
            client.response_complete(ex)
            return
        # Died mid-exchange. A reused idle connection that never produced a byte was most
        # likely closed by the backend's keep-alive timer just as we sent: safe to replay.
        client.upstream_failed(ex, 502, self.reused and not self.got_bytes)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(False)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            # Bytes from an idle backend belong to no request; the connection is unusable.
            self.close()
            return
        self.got_bytes = True
        ctx = self.ctx
        self.deadline = ctx.now + ctx.upstream_response_timeout
        out = self.out = []
        client = self.client
        assert client is not None
        stray = False
        try:
            if not self.head_done:
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
        except (httptools.HttpParserError, BadResponse) as exc:
            self._broken(ex, client, out, exc)
            return
        if out and not client.closed:
            client.transport.writelines(out)  # type: ignore[union-attr]
        if self.complete:
            self._release(ex, client, reusable=self.keep and not stray)

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
        # llhttp has validated the head (strict CRLF, token and value syntax, one
        # Content-Length), so the raw bytes can be rewritten rather than re-parsed.
        buf = self._headbuf
        start = self._head_start
        end = buf.find(b"\r\n\r\n", start)
        self._head_start = end + 4
        eol = buf.find(b"\r\n", start)
        status = self.parser.get_status_code()
        if buf.startswith(b"HTTP/1.1 ", start):
            line = buf[start:eol]
        else:
            line = b"HTTP/1.1" + buf[start + 8 : eol]
        block = buf[eol:end]  # "\r\nName: value" per field
        parts = [line]
        pos = 0
        cl = te = None
        tokens: list[bytes] | None = None
        for m in http.RESPONSE_SPECIAL_RE.finditer(block):
            name = m.group(1).lower()
            if name == b"content-length":
                value = m.group(2).rstrip(b" \t")
                if not http.CONTENT_LENGTH_RE.fullmatch(value) or (cl is not None and cl != value):
                    raise BadResponse("bad Content-Length")
                cl = value
                continue  # kept as it is
            parts.append(block[pos : m.start()])
            pos = m.end()
            if name == b"transfer-encoding":
                v = m.group(2).rstrip(b" \t")
                te = v if te is None else te + b"," + v
            elif name == b"connection":
                t = http.connection_tokens(m.group(2))
                tokens = t if tokens is None else tokens + t
        parts.append(block[pos:])
        if tokens is not None and any(t not in (b"close", b"keep-alive") for t in tokens):
            parts = [b"".join(parts)]
            parts[0] = http.drop_nominated_raw(parts[0], tokens)
        if status < 200:
            if status == 101:
                raise BadResponse("101 without an upgrade request")
            # 1xx interim responses (100 Continue, 103 Early Hints) are forwarded to
            # HTTP/1.1 clients; the final response follows on the same parser.
            if not ex.http10:
                parts.append(b"\r\n\r\n")
                self.out.append(b"".join(parts))
            self.interim = True
            return
        if te is not None and cl is not None:
            raise BadResponse("Content-Length and Transfer-Encoding together")
        no_body = ex.is_head or status in (204, 304)
        if cl is not None or no_body:
            self.mode = _NONE if no_body else _RAW
        else:
            if te is not None:
                if http.connection_tokens(te)[-1:] != [b"chunked"]:
                    raise BadResponse("unsupported transfer coding")
            else:
                self.close_delimited = True
            if ex.http10:
                self.mode = _RAW
                ex.keep_alive = False  # the end of the body is the end of the connection
            else:
                self.mode = _CHUNK
                parts.append(b"\r\nTransfer-Encoding: chunked")
        ctx = self.ctx
        if ctx.x_forwarded_server:
            parts += (b"\r\nX-Forwarded-Server: ", self.backend.authority.encode())
        if not ex.keep_alive or client.close_after or ctx.draining:
            ex.keep_alive = False
            parts.append(b"\r\nConnection: close\r\n\r\n")
        elif ex.http10:
            parts.append(b"\r\nConnection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n\r\n")
        self.out.append(b"".join(parts))
        self.keep = self.parser.should_keep_alive()
        self.head_done = True
        ex.response_started = True

    def on_body(self, body: bytes) -> None:
        mode = self.mode
        if mode == _RAW:
            self.out.append(body)
        elif mode == _CHUNK:
            self.out += (b"%x\r\n" % len(body), body, CRLF)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.mode == _CHUNK:
            self.out.append(b"0\r\n\r\n")
        self.complete = True

    # -- exchange lifecycle (called by ClientConnection) -----------------------------------

    def start(self, ex: Exchange, client: ClientConnection, body: list[bytes]) -> None:
        self.ex = ex
        self.client = client
        self._reset()
        self.ctx.upstreams.add(self)
        transport = self.transport
        assert transport is not None
        if body:
            transport.writelines((ex.head, *body))
        else:
            transport.write(ex.head)
        self.deadline = (
            self.ctx.now + self.ctx.upstream_response_timeout if ex.request_done else _INF
        )

    def send(self, pieces: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(pieces)

    def request_sent(self) -> None:
        self.deadline = self.ctx.now + self.ctx.upstream_response_timeout

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def abandon(self) -> None:
        """The client is gone or its request broke mid-way: this connection's state is unknown."""
        self.ex = self.client = None
        self.ctx.upstreams.discard(self)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def on_timeout(self) -> None:
        ex, client = self.ex, self.client
        self.deadline = _INF
        if ex is None or client is None:
            return
        self.ex = self.client = None
        self.ctx.upstreams.discard(self)
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
        client.upstream_failed(ex, 504, False)

    def _release(self, ex: Exchange, client: ClientConnection, *, reusable: bool) -> None:
        self.ex = self.client = None
        self.ctx.upstreams.discard(self)
        self.deadline = _INF
        if (
            reusable
            and ex.request_done
            and not self.close_delimited
            and not self.ctx.draining
            and self.pool.put(self, self.ctx.now)
        ):
            self.reused = True
            if client.write_paused:
                self.resume_reading()  # an idle connection must notice the backend closing
        else:
            self.close()
        if not client.closed:
            client.response_complete(ex)

    def _broken(
        self, ex: Exchange, client: ClientConnection, out: list[bytes], exc: Exception
    ) -> None:
        log.warning("backend %s sent a malformed response: %s", self.backend.authority, exc)
        self.ex = self.client = None
        self.ctx.upstreams.discard(self)
        self.close()
        if self.complete:
            # The response itself was whole; what followed it was not ours to forward.
            if out and not client.closed:
                assert client.transport is not None
                client.transport.writelines(out)
            client.response_complete(ex)
        else:
            client.upstream_failed(ex, 502, False)

    def __repr__(self) -> str:
        state = "busy" if self.ex is not None else "idle"
        return f"UpstreamConnection({self.backend.authority}, {state})"
