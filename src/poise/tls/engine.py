"""One TLS connection's records, for the listener's TLS transport (``tls/transport.py``).

Theory of operation
-------------------
An engine wraps the ``_ssl._SSLSocket`` that ``SSLContext._wrap_bio`` makes for a
connection (two memory BIOs: the bytes read from the socket go in, the records to send come
out). Everything TLS decides stays Python's ``ssl``: the context's versions and ciphers,
the SNI callback that picks the certificate, ALPN, client certificates, session tickets;
``getpeercert()``, ``session_reused`` and the like are read from that ``_SSLSocket``
(``engine.sslobj``). The engine only moves bytes, in five calls:

* ``handshake(data)``: feed what was read, step the handshake; True once complete,
  ``ssl.SSLError`` when it failed (the alert OpenSSL wrote is in ``take()``).
* ``read(data)``: feed, then every byte of application data that can be decrypted now
  (``b""`` when a record is still incomplete); ``peer_closed`` turns True on the peer's
  close_notify.
* ``write(data)`` / ``writelines(pieces)``: encrypt, returning the records to send.
* ``take()``: records waiting to be sent (after a handshake step, a read, a shutdown).
* ``tls13``: whether TLS 1.3 was negotiated.
* ``shutdown()``: send close_notify once; True when the peer's has arrived too.

Two implementations, the same answers: ``_engine.c`` (``poise.tls._engine.Engine``), built
by a compiled install, and ``PyEngine`` below, its pure-Python twin through the
``_SSLSocket``'s methods. ``make`` picks the C one when it was built and accepted this
Python's ``_ssl``; ``native_error()`` says why not otherwise.
"""

from __future__ import annotations

import ssl
import sys
from typing import Any, Protocol

__all__ = ["Engine", "PyEngine", "make", "native_error", "use_native"]

try:
    from poise.tls import _engine as _native_module
except ImportError:  # not built: the twin
    _native: Any = None
else:
    _native = _native_module

_EMPTY = b""
_CHUNK = 65536


class Engine(Protocol):
    """What the transport needs from an engine (both implementations have it)."""

    @property
    def peer_closed(self) -> bool: ...
    @property
    def sslobj(self) -> Any: ...
    @property
    def tls13(self) -> bool: ...
    def handshake(self, data: bytes | None, /) -> bool: ...
    def read(self, data: bytes | None, /) -> bytes: ...
    def write(self, data: bytes | bytearray | memoryview, /) -> bytes: ...
    def writelines(self, pieces: Any, /) -> bytes: ...
    def take(self) -> bytes: ...
    def shutdown(self) -> bool: ...


class PyEngine:
    """The pure-Python twin of ``_engine.Engine``: the same calls, through ``_ssl``."""

    __slots__ = ("incoming", "outgoing", "peer_closed", "sslobj")

    def __init__(self, sslobj: Any, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self.sslobj = sslobj
        self.incoming = incoming
        self.outgoing = outgoing
        self.peer_closed = False

    def handshake(self, data: bytes | None, /) -> bool:
        if data is not None:
            self.incoming.write(data)
        try:
            self.sslobj.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        return True

    def read(self, data: bytes | None, /) -> bytes:
        if data is not None:
            self.incoming.write(data)
        if self.peer_closed:
            return _EMPTY
        out: list[bytes] = []
        while True:
            try:
                chunk = self.sslobj.read(_CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:  # close_notify, as older _ssl reports it
                self.peer_closed = True
                break
            out.append(chunk)
        if not out:
            return _EMPTY
        return out[0] if len(out) == 1 else _EMPTY.join(out)

    def write(self, data: bytes | bytearray | memoryview, /) -> bytes:
        view = memoryview(data)
        while view:
            n = self.sslobj.write(view)
            view = view[n:]
        return self.outgoing.read()

    def writelines(self, pieces: Any, /) -> bytes:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                n = self.sslobj.write(view)
                view = view[n:]
        return self.outgoing.read()

    def take(self) -> bytes:
        return self.outgoing.read()

    @property
    def tls13(self) -> bool:
        return bool(self.sslobj.version() == "TLSv1.3")

    def shutdown(self) -> bool:
        try:
            self.sslobj.shutdown()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except ssl.SSLError:
            return False  # broken anyway: the caller closes the socket
        return True


_native_error: str | None = None if _native is not None else "not built"
_checked = False
use_native = True  # tests set it to run the twin


def native_error() -> str | None:
    """None when connections get the C engine (``_engine.c``), else why not."""
    global _native_error, _checked
    if not _checked:
        _checked = True
        if _native is not None:
            if sys.version_info[:2] not in ((3, 11), (3, 12), (3, 13)):
                _native_error = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
            else:
                import _ssl

                answer = _native.setup(getattr(_ssl, "__file__", None), ssl.SSLError)
                _native_error = None if answer is True else str(answer)
    return _native_error


def make(context: ssl.SSLContext) -> Engine:
    """A server-side engine for a new connection to a listener with ``context``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context._wrap_bio(  # type: ignore[attr-defined]  # what wrap_bio calls
        incoming, outgoing, server_side=True, server_hostname=None
    )
    if use_native and native_error() is None:
        engine: Engine = _native.Engine(sslobj)
        return engine
    return PyEngine(sslobj, incoming, outgoing)
