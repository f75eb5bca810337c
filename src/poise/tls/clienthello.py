"""Read the server name (SNI) from a TLS ClientHello without decrypting anything, so an L4
listener can route a TLS connection by name and pass its bytes through untouched.

Theory of operation
-------------------
The caller peeks at the first bytes of a connection and calls ``read_server_name`` with all
bytes seen so far; the answer is *more* (call again with more bytes), *done* with the name (or
None: the client sent no SNI), or *invalid* (not a TLS ClientHello, or one too large; the
caller closes or uses its default route). Nothing is consumed: the same bytes are then relayed
to the chosen backend, which does the real handshake.

Wire format, outermost first:

* TLS record (RFC 8446 §5.1; RFC 5246 §6.2.1): ``type(1)=22 handshake``, ``legacy_version(2)``,
  ``length(2) <= 2^14``, fragment. A handshake message may span several records ("fragmented
  records"), so fragments of consecutive handshake records are joined before parsing.
* Handshake (RFC 8446 §4): ``msg_type(1)=1 client_hello``, ``length(3)``, body.
* ClientHello (RFC 8446 §4.1.2): ``legacy_version(2)``, ``random(32)``,
  ``legacy_session_id<0..32>``, ``cipher_suites<2..2^16-2>``,
  ``legacy_compression_methods<1..2^8-1>``, ``extensions<8..2^16-1>`` (absent in very old
  clients: then there is no SNI).
* Extension ``server_name(0)`` (RFC 6066 §3): ``server_name_list<1..2^16-1>`` of
  ``name_type(1)=0 host_name``, ``HostName<1..2^16-1>``. At most one name per type; the
  host name is ASCII, without a trailing dot.

``limit`` bounds how many bytes are buffered waiting for a complete ClientHello (real ones
are under 2 KiB; post-quantum key shares push them to ~2-3 KiB): beyond it the answer is
invalid, so a client cannot make the listener buffer without end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MORE", "SniPeek", "read_server_name"]

DEFAULT_LIMIT = 16 * 1024
_RECORD_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_SUPPORTED_VERSIONS = 43
_SSL3 = 0x0300
_TLS12 = 0x0303
_HOST_NAME = 0
_MAX_RECORD = 1 << 14
_HOST_RE = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")


@dataclass(frozen=True, slots=True)
class SniPeek:
    state: str  # "more" | "done" | "invalid"
    server_name: str | None = None  # with "done": the name, lower-case; None = no SNI
    reason: str = ""  # with "invalid": why
    # with "done": the TLS versions the client offers, as on the wire (0x0303 is TLS 1.2):
    # its supported_versions extension's (RFC 8446 §4.2.1; GREASE values left out), else
    # every version up to its legacy_version (TLS 1.2 and older clients)
    versions: tuple[int, ...] = ()

    @property
    def done(self) -> bool:
        return self.state == "done"


MORE = SniPeek("more")


def _invalid(reason: str) -> SniPeek:
    return SniPeek("invalid", reason=reason)


def _handshake_bytes(data: bytes, limit: int) -> tuple[bytes, bool] | SniPeek:
    """The handshake bytes carried by the leading records, and whether the ClientHello
    message is complete in them."""
    pos = 0
    out = bytearray()
    while True:
        if len(out) >= 4:
            need = 4 + int.from_bytes(out[1:4], "big")
            if len(out) >= need:
                return bytes(out[:need]), True
        if len(data) - pos < 5:
            return bytes(out), False
        rtype, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if rtype != _RECORD_HANDSHAKE:
            return _invalid("not a TLS handshake record")
        if major != 3:
            return _invalid("not a TLS record version")
        if length == 0 or length > _MAX_RECORD:
            return _invalid("bad TLS record length")
        fragment = data[pos + 5 : pos + 5 + length]
        out += fragment
        if len(fragment) < length:
            return bytes(out), False
        pos += 5 + length
        if pos > limit:
            return _invalid("ClientHello larger than the limit")


def read_server_name(data: bytes, *, limit: int = DEFAULT_LIMIT) -> SniPeek:
    """What the ClientHello at the start of ``data`` asks for (see the module doc)."""
    if data and data[0] != _RECORD_HANDSHAKE:
        return _invalid("not a TLS handshake record")
    found = _handshake_bytes(data, limit)
    if isinstance(found, SniPeek):
        return found
    msg, complete = found
    if msg and msg[0] != _CLIENT_HELLO:
        return _invalid("first handshake message is not a ClientHello")
    if len(msg) >= 4 and 4 + int.from_bytes(msg[1:4], "big") > limit:
        return _invalid("ClientHello larger than the limit")
    if not complete:
        return MORE if len(data) <= limit else _invalid("ClientHello larger than the limit")
    try:
        return _client_hello(memoryview(msg)[4:])
    except IndexError:
        return _invalid("malformed ClientHello")


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise IndexError("truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, size_bytes: int) -> memoryview:
        return self.take(self.number(size_bytes))

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def _client_hello(body: memoryview) -> SniPeek:
    r = _Reader(body)
    legacy = r.number(2)
    r.take(32)  # random
    if len(r.vector(1)) > 32:
        return _invalid("session id longer than 32 bytes")
    r.vector(2)  # cipher_suites
    r.vector(1)  # compression methods
    upto = tuple(range(_SSL3, min(legacy, _TLS12) + 1))
    if r.left == 0:
        return SniPeek("done", versions=upto)  # no extensions at all (SSL 3.0-era clients)
    exts = _Reader(r.vector(2))
    if r.left:
        return _invalid("bytes after the extensions")
    name: str | None = None
    versions: tuple[int, ...] | None = None
    seen: set[int] = set()
    while exts.left:
        etype = exts.number(2)
        data = exts.vector(2)
        if etype in seen:
            return _invalid("an extension appears twice")  # RFC 8446 §4.2
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            name = _server_name(_Reader(data))
            if name == "":
                return _invalid("malformed server_name extension")
        elif etype == _EXT_SUPPORTED_VERSIONS:
            listed = _Reader(data).vector(1)
            if len(listed) != len(data) - 1 or not listed or len(listed) % 2:
                return _invalid("malformed supported_versions extension")
            offered = (int.from_bytes(listed[i : i + 2], "big") for i in range(0, len(listed), 2))
            # GREASE values (RFC 8701) are 0x?A?A: never a version
            versions = tuple(v for v in offered if v & 0x0F0F != 0x0A0A)
    return SniPeek("done", name, versions=upto if versions is None else versions)


def _server_name(r: _Reader) -> str | None:
    """The host_name of a server_name extension; "" when it is malformed."""
    names = _Reader(r.vector(2))
    if r.left or not names.left:
        return ""
    host: str | None = None
    while names.left:
        kind = names.number(1)
        value = bytes(names.vector(2))
        if kind != _HOST_NAME:
            continue  # other name types are not defined; skipped as RFC 6066 allows
        if host is not None or not _HOST_RE.fullmatch(value):
            return ""
        host = value.decode("ascii").lower().rstrip(".")
    return host
