"""The TLS transport of poise's HTTPS listeners: the protocol of the client's TCP
connection, and the transport its HTTP connection (``ClientConnection``) writes to.

Theory of operation
-------------------
``TlsGate`` (``tls/gate.py``) hands a connection over once its first bytes look like TLS:
``TlsTransport`` becomes the TCP transport's protocol and the bytes read so far are its
first input. It makes the connection's ``engine`` (``tls/engine.py``: OpenSSL through
memory BIOs, in C when built) and drives it:

* **Handshake.** Every read is fed to the engine and whatever OpenSSL answers (the
  server's flight, an alert) is written at once. When the handshake is complete the
  gate's deadline timer is cancelled, the HTTP protocol's ``connection_made`` runs with
  this transport, and application data that came with the client's last flight is
  decrypted and delivered. With TLS 1.3 what completing the handshake wrote is the session
  tickets (RFC 8446 §4.6.1): they wait in the engine and go out with the first response
  (or close_notify), one write and one wake-up of the client less per connection. With
  TLS 1.2 it is the server's Finished, which the client awaits: it goes out at once. A
  handshake that fails gets OpenSSL's alert sent before the close (asyncio's and uvloop's
  TLS transports abort without it). A TCP end of stream during the handshake closes the
  connection.
* **Records.** A read decrypts every complete record into one ``data_received``; a write
  (or ``writelines``) encrypts into records sent with one ``write`` to the socket. Reading
  paused by the HTTP side pauses the socket; plaintext already decrypted is held and
  delivered on resume, from the event loop (never from inside ``resume_reading``).
  Write flow control is the socket's: its ``pause_writing``/``resume_writing`` go to the
  HTTP side, and the write buffer limits are the socket's (records add about 1% to the
  bytes buffered).
* **Ends.** The client's close_notify, or a TCP end of stream without one, is the HTTP
  side's ``eof_received``: a half-close lets responses still owed go out (TLS 1.3 allows
  it, RFC 8446 §6.1), otherwise the connection closes. ``write_eof`` sends close_notify
  and ends the TCP sending side, reading on (poise's lingering close after an error, and
  tunnels). ``close`` sends close_notify, then closes the socket once its buffer is
  flushed, without waiting for the client's close_notify, as nginx does; uvloop's
  transport waited, which cost every connection one more wake-up for the client's reply.
  ``abort`` drops the socket at once.

``get_extra_info`` answers ``ssl_object`` with the connection's ``_ssl._SSLSocket`` (so
``session_reused``, ``version()``, ``cipher()``, ``selected_alpn_protocol()`` work as on an
``SSLObject``), ``peercert``, ``cipher``, ``compression`` and ``sslcontext``; everything
else (``peername``, ``socket``...) is the TCP transport's.

This module is compiled with the hot path (``setup.py``'s ``HOT``); uncompiled it is the
same code.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Protocol

from poise.tls import engine as engines

__all__ = ["TlsTransport"]

log = logging.getLogger("poise.tls")

HANDSHAKE = 0
OPEN = 1
CLOSED = 2


class Deadline(Protocol):
    """The handshake's deadline (``TlsGate``): taken away once the handshake is done."""

    def cancel(self) -> None: ...


class TlsTransport:
    """One TLS connection to an HTTPS listener (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tcp: Any,
        app: Any,
        context: ssl.SSLContext,
        timer: Deadline | None,
    ) -> None:
        self.loop = loop
        self.tcp = tcp  # the TCP transport (the hub's Conn, uvloop's, or asyncio's)
        # the hub's Conn (wire/_hub.c) ends with write_last: the last records and the FIN in
        # one segment
        self.tcp_last = hasattr(tcp, "write_last")
        self.app = app  # the HTTP protocol: connection_made once the handshake is done
        self.context = context
        self.timer = timer  # the handshake deadline (the gate): cancelled once up
        self.engine: engines.Engine = engines.make(context)
        self.state = HANDSHAKE
        self.app_made = False
        self.paused = False  # the HTTP side paused reading
        self.held: list[bytes] = []  # plaintext decrypted while paused
        self.eof_held = False  # the client's end arrived while paused
        self.eof_seen = False  # the client's end was reported (close_notify or TCP)
        self.write_closed = False  # our close_notify went out
        self.tickets_held = False  # TLS 1.3 session tickets wait for the first write
        self.resume_scheduled = False

    # -- the TCP transport's protocol ------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.tcp = transport  # (set already: the gate hands the connection over)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == OPEN:
            try:
                plain = self.engine.read(data)
            except ssl.SSLError as exc:
                self._failed(exc)
                return
            self._deliver(plain)
        elif state == HANDSHAKE:
            self._handshake(data)
        # CLOSED: dropped

    def eof_received(self) -> bool | None:
        state = self.state
        if state == HANDSHAKE:
            self.state = CLOSED
            self._cancel_timer()
            return None  # the TCP transport closes itself
        if state == OPEN:
            if not self.eof_seen:
                if self.paused or self.held:
                    self.eof_held = True  # reported after what is held (resume_reading)
                    return True
                self._eof()
            # True: a half-close the HTTP side kept open (after close_notify too): it closes
            return self.state == OPEN
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self._cancel_timer()
        app, self.app = self.app, None  # (the HTTP side holds this transport: no cycle)
        if self.app_made:
            self.app_made = False
            app.connection_lost(exc)
        self.held = []

    def pause_writing(self) -> None:
        if self.app_made:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app_made:
            self.app.resume_writing()

    # -- the HTTP side's transport ---------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._encrypt(data, False)

    def writelines(self, pieces: Any) -> None:
        self._encrypt(pieces, True)

    def write_last(self, pieces: list[bytes | memoryview]) -> None:
        """``writelines(pieces)`` and close_notify in one write: the HTTP side's last bytes
        before it closes (``close`` then only closes the socket)."""
        self._encrypt(pieces, True, last=True)

    def close(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        self.held = []
        self._send_close_notify()
        self.tcp.close()  # after the buffered records (and close_notify) are flushed

    def abort(self) -> None:
        self.state = CLOSED
        self._cancel_timer()
        self.held = []
        self.tcp.abort()

    def is_closing(self) -> bool:
        return self.state != OPEN

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.state != OPEN or self.write_closed:
            return
        self._send_close_notify()
        self.tcp.write_eof()

    def pause_reading(self) -> None:
        if self.paused:
            return
        self.paused = True
        if self.state == OPEN:
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.state != OPEN:
            return
        self.tcp.resume_reading()
        if (self.held or self.eof_held) and not self.resume_scheduled:
            self.resume_scheduled = True
            self.loop.call_soon(self._release)

    def is_reading(self) -> bool:
        return not self.paused and self.state == OPEN

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        limits: tuple[int, int] = self.tcp.get_write_buffer_limits()
        return limits

    def get_write_buffer_size(self) -> int:
        size: int = self.tcp.get_write_buffer_size()
        return size

    def set_protocol(self, protocol: Any) -> None:
        self.app = protocol

    def get_protocol(self) -> Any:
        return self.app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.engine.sslobj
        if name == "peercert":
            return self.engine.sslobj.getpeercert() if self.app_made else default
        if name == "sslcontext":
            return self.context
        if name == "cipher":
            return self.engine.sslobj.cipher()
        if name == "compression":
            return self.engine.sslobj.compression()
        return self.tcp.get_extra_info(name, default)

    # -- internals -------------------------------------------------------------------------

    def _handshake(self, data: bytes | None) -> None:
        engine = self.engine
        try:
            done = engine.handshake(data)
        except ssl.SSLError as exc:
            self._failed(exc)
            return
        if not done:
            out = engine.take()  # the server's flight
            if out:
                self.tcp.write(out)
            return
        if engine.tls13:
            # what completing wrote is the session tickets: they go with the first
            # response (one write, and one wake-up of the client, less per connection)
            self.tickets_held = True
        else:
            out = engine.take()  # TLS 1.2: the server's Finished, which the client awaits
            if out:
                self.tcp.write(out)
        self.state = OPEN
        self._cancel_timer()
        self.app_made = True
        self.app.connection_made(self)
        if self.state == OPEN:  # application data that came with the client's Finished
            try:
                plain = engine.read(None)
            except ssl.SSLError as exc:
                self._failed(exc)
                return
            self._deliver(plain)

    def _deliver(self, plain: bytes) -> None:
        if plain:
            if self.paused:
                self.held.append(plain)
            else:
                self.app.data_received(plain)
        engine = self.engine
        if engine.peer_closed and not self.eof_seen and self.state == OPEN:
            if self.paused:
                self.eof_held = True
            else:
                self._eof()
        if self.state == OPEN and not self.tickets_held:
            out = engine.take()  # what reading made OpenSSL answer (a key update)
            if out:
                self.tcp.write(out)

    def _eof(self) -> None:
        self.eof_seen = True
        self.eof_held = False
        if not self.app.eof_received():
            self.close()

    def _release(self) -> None:
        """Deliver what was held while reading was paused (scheduled by resume)."""
        self.resume_scheduled = False
        while self.held and not self.paused and self.state == OPEN:
            self.app.data_received(self.held.pop(0))
        if self.eof_held and not self.paused and self.state == OPEN:
            self._eof()

    def _encrypt(self, data: Any, many: bool, last: bool = False) -> None:
        """Encrypt ``data`` (``pieces`` when ``many``) and send the records, with the
        tickets held, if any; with ``last``, close_notify in the same write."""
        if self.state != OPEN or self.write_closed:
            return
        engine = self.engine
        try:
            out = engine.writelines(data) if many else engine.write(data)
        except ssl.SSLError as exc:
            self._failed(exc)
            return
        self.tickets_held = False
        if last:
            self.write_closed = True
            engine.shutdown()
            if self.tcp_last:  # (the socket closes after them: close() has nothing left)
                self.tcp.write_last((out, engine.take()))
            else:
                self.tcp.writelines((out, engine.take()))
        elif out:
            self.tcp.write(out)

    def _send_close_notify(self) -> None:
        if self.write_closed or not self.app_made:
            return
        self.write_closed = True
        self.tickets_held = False
        engine = self.engine
        engine.shutdown()
        out = engine.take()
        if out:
            self.tcp.write(out)

    def _failed(self, exc: ssl.SSLError) -> None:
        """The handshake failed, or a record did not decrypt: send the alert OpenSSL wrote,
        then close (the HTTP side, if it was told of the connection, sees connection_lost)."""
        log.debug("TLS connection failed: %s", exc)
        self.state = CLOSED
        self._cancel_timer()
        self.held = []
        try:
            out = self.engine.take()
        except ssl.SSLError:
            out = b""
        if out:
            self.tcp.write(out)
        self.tcp.close()

    def _cancel_timer(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()

    def __repr__(self) -> str:
        return f"TlsTransport(state={self.state}, app={type(self.app).__name__})"
