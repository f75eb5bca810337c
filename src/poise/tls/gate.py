"""An HTTPS listener's first look at a connection, before any TLS: plain HTTP gets a 400, a
client offering no TLS version the listener accepts gets a ``protocol_version`` alert.

Theory of operation
-------------------
HTTPS listeners are created without ``ssl``: each connection starts with a ``TlsGate``,
which reads the first bytes and decides:

* A first byte that is an ASCII letter cannot start a TLS record (a handshake record starts
  with 22): it is a plain HTTP request sent to the HTTPS port. It gets nginx's answer, 400
  "The plain HTTP request was sent to HTTPS port", then poise ends its side and closes once
  the client has ended its own (or the handshake time is up), so the answer is not lost to
  a reset caused by request bytes still unread.
* A TLS ClientHello (read by ``clienthello``) that offers no version in the listener's
  ``min_version``..``max_version``: a fatal ``protocol_version`` alert (70), then close.
  This is what OpenSSL answers too (and poise's TLS transport sends OpenSSL's alerts), but
  answering here costs no handshake state at all.
* Anything else goes to TLS: the connection's protocol becomes poise's TLS transport
  (``tls/transport.py``) around the application's protocol, and the bytes read so far are
  its first input. OpenSSL decides from there (bytes that are not TLS, or a broken
  ClientHello, fail the handshake, and the client gets OpenSSL's alert).

With the default range (TLS 1.2 and 1.3) the gate does not wait for the whole ClientHello:
a ClientHello whose ``legacy_version`` is TLS 1.2, which every client able to speak 1.2 or
1.3 sends, goes to TLS after its first 11 bytes. Otherwise the gate waits for the whole
ClientHello (the server cannot answer before it anyway), at most ``clienthello``'s limit.
One deadline covers the gate and the handshake, kept in the context's ``handshaking`` set
and checked by its sweep (``Context._tick``, every ``TICK``): the TLS transport takes the
gate off it once the handshake is complete.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from poise.tls.clienthello import read_server_name
from poise.tls.transport import TlsTransport

if TYPE_CHECKING:
    from poise.l7.context import Context
    from poise.tls.contexts import ListenerTls

__all__ = ["PLAIN_HTTP", "TlsGate", "protocol_version_alert"]

log = logging.getLogger("poise.tls")

PLAIN_HTTP = "The plain HTTP request was sent to HTTPS port"
WIRE = {"1.2": 0x0303, "1.3": 0x0304}
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_TLS12 = 0x0303
_TLS13 = 0x0304
_PROTOCOL_VERSION = 70


def protocol_version_alert(record_version: bytes) -> bytes:
    """A fatal ``protocol_version`` alert record (RFC 8446 §6.2; RFC 5246 §7.2), in the
    record version the client used (as OpenSSL does)."""
    return b"\x15" + record_version + b"\x00\x02\x02" + bytes((_PROTOCOL_VERSION,))


class TlsGate:
    """One connection to an HTTPS listener until it is handed to TLS (or refused). An
    asyncio protocol (compiled with the hot path: no base class, the loop needs none)."""

    def __init__(
        self,
        ctx: Context,
        tls: ListenerTls,
        app: Callable[[], asyncio.BaseProtocol],
        timeout: float,
        plain_reply: Callable[[], bytes],
    ) -> None:
        self.ctx = ctx
        self.tls = tls
        self.app = app  # makes the protocol that serves the connection once TLS is up
        self.timeout = timeout  # for the handshake, the gate's time included
        self.plain_reply = plain_reply  # the 400 for plain HTTP
        self.buf = b""
        self.refused = False
        self.transport: asyncio.Transport | None = None
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        # the handshake's deadline: the context's sweep (every TICK) calls on_timeout, which
        # costs a set entry per connection instead of one of the loop's timers
        ctx = self.ctx
        self.deadline = ctx.clock() + self.timeout
        ctx.handshaking.add(self)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # answered already: what the client still sends is read and dropped
        self.buf = buf = self.buf + data
        first = buf[0]
        if first == _HANDSHAKE:
            verdict = self._versions_ok(buf)
            if verdict is None:
                return  # more of the ClientHello to come
            if verdict:
                self._start_tls()
            else:
                self._refuse_version(buf[1:3])
        elif 65 <= first <= 90 or 97 <= first <= 122:  # an ASCII letter: an HTTP method
            self._refuse_plain_http()
        else:
            self._start_tls()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel()

    def cancel(self) -> None:
        """No deadline any more: the handshake is complete, or the connection gone (the TLS
        transport calls it after the hand-over)."""
        self.ctx.handshaking.discard(self)

    def _versions_ok(self, buf: bytes) -> bool | None:
        """Whether the ClientHello offers a version the listener accepts (True also when it
        cannot be read: OpenSSL decides then); None until enough of it is here."""
        lo, hi = WIRE[self.tls.cfg.min_version], WIRE[self.tls.cfg.max_version]
        if len(buf) < 11:
            return None
        both = lo <= _TLS12 and hi >= _TLS13
        in_first_record = (buf[3] << 8 | buf[4]) >= 6 and buf[5] == _CLIENT_HELLO
        if both and in_first_record and (buf[9] << 8 | buf[10]) >= _TLS12:
            return True  # a TLS 1.2 or 1.3 client: no need to wait for the rest
        found = read_server_name(buf)
        if found.state == "more":
            return None
        if found.state != "done":
            return True
        return any(lo <= v <= hi for v in found.versions)

    def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None
        data, self.buf = self.buf, b""
        self.tls.handshakes += 1
        try:
            # the handshake's deadline stays this gate's: the TLS transport cancels it once up
            tls = TlsTransport(self.ctx.loop, transport, self.app(), self.tls.context, self)
        except (ssl.SSLError, ValueError, TypeError, RuntimeError) as exc:
            log.error("TLS could not start on a connection: %s", exc)
            self.cancel()
            transport.abort()
            return
        transport.set_protocol(cast(asyncio.BaseProtocol, tls))  # (duck-typed, like uvloop's)
        tls.data_received(data)

    def _refuse_version(self, record_version: bytes) -> None:
        self.refused = True
        self.tls.version_alerts += 1
        assert self.transport is not None
        self.transport.write(protocol_version_alert(record_version))
        self.transport.close()

    def _refuse_plain_http(self) -> None:
        self.refused = True
        self.tls.plain_http += 1
        transport = self.transport
        assert transport is not None
        transport.write(self.plain_reply())
        if transport.can_write_eof():
            transport.write_eof()  # then close at the client's end, or the deadline
        else:
            transport.close()

    def on_timeout(self) -> None:
        self.cancel()
        if self.transport is not None:
            if self.refused:
                self.transport.close()
            else:
                self.transport.abort()  # as a handshake that takes too long
