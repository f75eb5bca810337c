"""Which protocol serves a new connection on a listener with ``http2`` on (the rest is in
front.py, engine.py and convert.py).

* HTTPS listeners offer ``h2`` and ``http/1.1`` by ALPN; ``AlpnChoice`` is the TLS
  transport's application until the handshake is done, then hands the connection to an
  ``H2Session`` or a ``ClientConnection`` by what the client chose.
* Plain listeners with ``http2`` on take HTTP/2 with prior knowledge (h2c, RFC 9113 §3.3)
  beside HTTP/1.1: ``Preface`` looks at the first bytes; the connection preface
  ``PRI * HTTP/2.0`` goes to an ``H2Session``, anything else to a ``ClientConnection``.
  (The HTTP/1.1 ``Upgrade: h2c`` dance is not offered: RFC 9113 deprecates it.)
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from poise.h2.engine import Settings, default_engine
from poise.h2.front import PREFACE, H2Session
from poise.l7.client import ClientConnection

if TYPE_CHECKING:
    from poise.config.model import Http2Config
    from poise.l7.context import Context
    from poise.tls.contexts import ListenerTls

__all__ = ["AlpnChoice", "Preface", "engine_settings", "factory"]


def engine_settings(cfg: Http2Config) -> Settings:
    return Settings(
        max_concurrent_streams=cfg.max_concurrent_streams,
        initial_window_size=cfg.initial_window_size,
        connection_window=max(cfg.initial_window_size * 4, 1024 * 1024),
        max_frame_size=cfg.max_frame_size,
        max_header_list_size=cfg.max_header_list_size,
    )


class AlpnChoice:
    """The application of a TLS connection on an HTTP/2 listener until its handshake ends."""

    __slots__ = ("ctx", "kind", "listener", "settings", "tls")

    def __init__(
        self, ctx: Context, listener: str, tls: ListenerTls, settings: Settings, kind: str
    ) -> None:
        self.ctx = ctx
        self.listener = listener
        self.tls = tls
        self.settings = settings
        self.kind = kind

    def connection_made(self, transport: Any) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        app: Any
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            app = H2Session(self.ctx, self.listener, self.tls, self.settings, self.kind)
        else:
            app = ClientConnection(self.ctx, self.listener, self.tls)
        transport.set_protocol(app)
        app.connection_made(transport)

    # (the TLS transport calls nothing else before connection_made)


class Preface:
    """The first bytes of a connection to a plain listener with HTTP/2 on (an asyncio
    protocol until it hands over). It has the request head's time to decide."""

    __slots__ = ("buf", "ctx", "deadline", "kind", "listener", "settings", "transport")

    def __init__(self, ctx: Context, listener: str, settings: Settings, kind: str) -> None:
        self.ctx = ctx
        self.listener = listener
        self.settings = settings
        self.kind = kind
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        ctx = self.ctx
        self.deadline = ctx.clock() + ctx.client_header_timeout
        ctx.handshaking.add(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if len(buf) < len(PREFACE) and PREFACE.startswith(buf):
            self.buf = buf
            return
        self.buf = b""
        self.ctx.handshaking.discard(self)
        app: Any
        if buf.startswith(PREFACE):
            app = H2Session(self.ctx, self.listener, None, self.settings, self.kind)
        else:
            app = ClientConnection(self.ctx, self.listener, None)
        transport = self.transport
        assert transport is not None
        transport.set_protocol(app)
        app.connection_made(transport)
        app.data_received(buf)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.handshaking.discard(self)

    def on_timeout(self) -> None:
        self.ctx.handshaking.discard(self)
        if self.transport is not None:
            self.transport.close()


def factory(ctx: Context, listener: str, tls: ListenerTls | None, cfg: Http2Config) -> Any:
    """The protocol factory (for TLS: the application factory) of an HTTP/2 listener; None
    when no HTTP/2 engine is installed (the listener then serves HTTP/1.1 only)."""
    kind = default_engine()
    if kind is None:
        return None
    settings = engine_settings(cfg)
    if tls is not None:
        return lambda: AlpnChoice(ctx, listener, tls, settings, kind)
    return lambda: Preface(ctx, listener, settings, kind)
