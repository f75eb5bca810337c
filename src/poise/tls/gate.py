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
  This is what OpenSSL answers too, but asyncio's and uvloop's TLS transports never send
  it: when a handshake fails they abort the connection without flushing what OpenSSL left in
  their outgoing buffer (``SSLProtocol._on_handshake_complete`` -> ``_fatal_error`` ->
  ``transport._force_close``), so such a client saw only a bare close.
* Anything else goes to TLS: the connection's protocol becomes the event loop's own
  ``SSLProtocol`` around the application's protocol (what ``create_server(ssl=...)`` sets
  up) and the bytes read so far are fed to it. OpenSSL decides from there, as before (bytes
  that are not TLS, or a broken ClientHello, fail the handshake).

With the default range (TLS 1.2 and 1.3) the gate does not wait for the whole ClientHello:
a ClientHello whose ``legacy_version`` is TLS 1.2, which every client able to speak 1.2 or
1.3 sends, goes to TLS after its first 11 bytes. Otherwise the gate waits for the whole
ClientHello (the server cannot answer before it anyway), at most ``clienthello``'s limit.
The handshake timeout covers the gate's time too: the TLS layer gets what is left of it.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from poise.tls.clienthello import read_server_name

if TYPE_CHECKING:
    from poise.tls.contexts import ListenerTls

__all__ = ["PLAIN_HTTP", "TlsGate", "protocol_version_alert"]

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


_PROTOCOLS: dict[type, Any] = {}  # _ssl_protocol's answers by the loop's class


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol class: uvloop's with uvloop, else asyncio's."""
    found = _PROTOCOLS.get(type(loop))
    if found is not None:
        return found
    try:
        import uvloop
        from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]  # not in its stubs
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        found = asyncio.sslproto.SSLProtocol
    else:
        found = SSLProtocol if isinstance(loop, uvloop.Loop) else asyncio.sslproto.SSLProtocol
    _PROTOCOLS[type(loop)] = found
    return found


def _retrieve(waiter: asyncio.Future[None]) -> None:
    # a failed handshake is already handled (the connection is closed): only read it
    if not waiter.cancelled():
        waiter.exception()


class TlsGate(asyncio.Protocol):
    """One connection to an HTTPS listener until it is handed to TLS (or refused)."""

    __slots__ = (
        "app",
        "buf",
        "deadline",
        "loop",
        "plain_reply",
        "refused",
        "timeout",
        "timer",
        "tls",
        "transport",
    )

    def __init__(
        self,
        tls: ListenerTls,
        app: Callable[[], asyncio.BaseProtocol],
        timeout: float,
        plain_reply: Callable[[], bytes],
    ) -> None:
        self.tls = tls
        self.app = app  # makes the protocol that serves the connection once TLS is up
        self.timeout = timeout  # for the handshake, the gate's time included
        self.plain_reply = plain_reply  # the 400 for plain HTTP
        self.buf = b""
        self.refused = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.loop = loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.timeout
        self.timer = loop.call_at(self.deadline, self._expire)

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
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _versions_ok(self, buf: bytes) -> bool | None:
        """Whether the ClientHello offers a version the listener accepts (True also when it
        cannot be read: OpenSSL decides then); None until enough of it is here."""
        lo, hi = WIRE[self.tls.cfg.min_version], WIRE[self.tls.cfg.max_version]
        if len(buf) < 11:
            return None
        both = lo <= _TLS12 and hi >= _TLS13
        in_first_record = int.from_bytes(buf[3:5], "big") >= 6 and buf[5] == _CLIENT_HELLO
        if both and in_first_record and int.from_bytes(buf[9:11], "big") >= _TLS12:
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
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        loop = self.loop
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(_retrieve)
        left = max(self.deadline - loop.time(), 0.001)
        proto = _ssl_protocol(loop)(
            loop, self.app(), self.tls.context, waiter, server_side=True,
            ssl_handshake_timeout=left,
        )  # fmt: skip
        transport.pause_reading()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        data = memoryview(self.buf)
        self.buf = b""
        while data and not transport.is_closing():
            into = proto.get_buffer(len(data))
            n = min(len(into), len(data))
            into[:n] = data[:n]
            proto.buffer_updated(n)
            data = data[n:]
        if not transport.is_closing():
            transport.resume_reading()

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

    def _expire(self) -> None:
        self.timer = None
        if self.transport is not None:
            if self.refused:
                self.transport.close()
            else:
                self.transport.abort()  # as a handshake that takes too long
