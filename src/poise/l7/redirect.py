"""A listener that sends every request to the same place over HTTPS (``redirect_https``).

Theory of operation
-------------------
One request per connection: the head is parsed by httptools with the proxy's limits, then
answered with ``301`` (or the configured 302/307/308; 307 and 308 keep the method and body,
RFC 9110 §15.4) and ``Location: https://<host>[:port]<target>``, where host is the request's
Host without its port (or an absolute-form target's authority) and target is passed on byte
for byte. The connection is then half-closed and whatever the client still sends is read and
dropped for a moment (a lingering close), so an unread request body cannot turn our answer
into a reset. A request without a usable Host gets 400: there is nowhere to send it.

This is not the hot path: each connection has its own timer (the header timeout, then the
linger), cancelled when it closes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from poise.l7 import http
from poise.l7.request import Exchange, Reject, origin_form

if TYPE_CHECKING:
    from poise.config.model import RedirectConfig
    from poise.l7.context import Context

LINGER = 2.0


class RedirectConnection(asyncio.Protocol):
    __slots__ = ("cfg", "ctx", "done", "host", "parser", "target", "timer", "transport")

    def __init__(self, ctx: Context, cfg: RedirectConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.host = b""
        self.target = b""
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.ctx.loop.call_later(self.ctx.client_header_timeout, self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.done:
            return  # lingering: dropped
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            reason = exc.__context__
            if isinstance(reason, Reject):
                self._answer(http.error_response(reason.status, reason.message,
                                                 self.ctx.date.value, close=True))  # fmt: skip
            else:
                self._answer(self._bad())
        except httptools.HttpParserUpgrade:
            pass  # the head was answered in on_headers_complete
        except httptools.HttpParserError:
            self._answer(self._bad())

    def _bad(self) -> bytes:
        return http.error_response(400, "Bad Request", self.ctx.date.value, close=True)

    # -- parser callbacks ------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > self.ctx.limits.max_target:
            raise Reject(414, "URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            if self.host or not http.HOST_RE.fullmatch(value):
                raise Reject(400, "Bad Request")
            self.host = value

    def on_headers_complete(self) -> None:
        if self.done:
            return
        target = self.target
        host = self.host
        if target[:1] != b"/":
            ex = Exchange()
            target = origin_form(ex, self.parser.get_method(), target)
            host = ex.host or host
            if target == b"*":
                target = b"/"
        if not host or not target.isascii() or b" " in target:
            raise Reject(400, "Bad Request")
        name = http.host_without_port(host)
        if not name:
            raise Reject(400, "Bad Request")
        port = b"" if self.cfg.port == 443 else b":%d" % self.cfg.port
        location = b"https://" + name + port + target
        self.ctx.stats.redirects += 1
        self._answer(
            http.status_line(self.cfg.status)
            + b"Date: " + self.ctx.date.value
            + b"\r\nLocation: " + location
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )  # fmt: skip

    # -- closing ---------------------------------------------------------------------------

    def _answer(self, response: bytes) -> None:
        transport = self.transport
        if transport is None or self.done:
            return
        self.done = True
        transport.write(response)
        if self.timer is not None:
            self.timer.cancel()
        if transport.can_write_eof():
            transport.write_eof()
            self.timer = self.ctx.loop.call_later(LINGER, self.close)
        else:
            self.close()

    def eof_received(self) -> bool | None:
        return None  # the client is done too: close

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def __repr__(self) -> str:
        return f"RedirectConnection(done={self.done})"
