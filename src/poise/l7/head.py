"""The request head codec: one whole request head in, what the proxy needs out.

``parse_request(data, settings)`` takes the bytes of one request head (the request line up
to and including the empty line that ends the head) and returns either a ``RequestHead``
(method, target, host, framing, upgrade, expect-continue, keep-alive and the rebuilt head to
forward) or a ``Rejection`` (the status and message to answer with before closing). It is a
plain function of its arguments: no I/O, no clock, no parser state.

It applies the rules of docs/http-rules.md that concern the head, as
``ClientConnection.on_url``/``on_header``/``on_headers_complete`` apply them on top of
httptools. It is not on the request path: there, plain heads take one scan (l7/scan.py, in C
src/poise/l7/_scan.c) and every other head goes through httptools and those callbacks. This
module is the written-out statement of the rules, checked against the live path's black-box
cases and against h11 (tests/l7/test_head.py).

Deliberately stricter than h11 (and the same as poise's httptools path): only methods llhttp
knows; HTTP/1.0 and HTTP/1.1 only (``HTTP/2.0`` → 505); no obs-fold, DEL or other control
bytes in values; one ``Content-Length`` at most, never with ``Transfer-Encoding``; no
``Transfer-Encoding`` in HTTP/1.0; targets in origin form, absolute form, or ``*`` for
``OPTIONS`` only, ASCII, without ``#`` or ``\\``; a ``Host`` that is a host. Deliberately more
lenient: empty lines before the request line are skipped (RFC 9112 §2.2), and an empty
element in ``Transfer-Encoding`` (``,chunked``) is tolerated. Fields whose name contains
``_`` are dropped (nginx's ``underscores_in_headers off``).
"""

from __future__ import annotations

import re
from typing import Final

from poise.l7 import http

CRLF: Final = b"\r\n"

# llhttp's HTTP request methods (others are refused with 400, as httptools refuses them)
METHODS: Final = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
# method SP request-target SP HTTP-version, one space each (RFC 9112 §3)
_LINE: Final = re.compile(rb"([A-Z-]+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
# field-name ":" OWS field-value OWS (RFC 9112 §5); no whitespace before the colon
_VCHAR: Final = rb"[\x21-\x7e\x80-\xff]+"  # visible bytes and obs-text; no DEL, no controls
_FIELD: Final = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:" + _VCHAR + rb"(?:[ \t]+" + _VCHAR + rb")*)?)[ \t]*"
)


class Settings:
    """What a listener's configuration says about request heads (from the Context)."""

    __slots__ = (
        "drop", "forwarded", "https", "max_body_size", "max_header_bytes", "max_headers",
        "max_target", "peer", "tls_fields", "trusted", "via", "x_forwarded",
    )  # fmt: skip

    def __init__(
        self,
        *,
        peer: bytes = b"127.0.0.1",
        trusted: bool = False,
        https: bool = False,
        x_forwarded: bool = True,
        forwarded: bool = False,
        via: bool = False,
        max_headers: int = 100,
        max_header_bytes: int = 65536,
        max_target: int = 8192,
        max_body_size: int = 0,
        drop: frozenset[bytes] = frozenset(),
        tls_fields: bytes = b"",
    ) -> None:
        self.peer = peer  # the client's address
        self.trusted = trusted  # the peer is in proxy.trusted_proxies
        self.https = https
        self.x_forwarded = x_forwarded
        self.forwarded = forwarded
        self.via = via
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_target = max_target
        self.max_body_size = max_body_size  # 0: no limit
        self.drop = drop  # lower-case names dropped from every request (certificate fields)
        self.tls_fields = tls_fields  # poise's own client-certificate line(s)


class RequestHead:
    """A request head poise accepts, and the head it forwards."""

    __slots__ = (
        "chunked", "content_length", "expect_continue", "head", "headers", "host", "http10",
        "keep_alive", "method", "target", "upgrade",
    )  # fmt: skip

    def __init__(self) -> None:
        self.method = b""
        self.target = b""  # as forwarded (origin form)
        self.host = b""  # b"" only for HTTP/1.0 without Host
        self.http10 = False
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade: bytes | None = None  # the Upgrade value, forwarded for a real upgrade
        self.expect_continue = False
        self.headers: list[bytes] = []  # forwarded client fields, flat: name, ": ", value, CRLF
        self.head = b""  # the rebuilt head to send to the backend

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r} {self.target[:80]!r})"


class Rejection:
    """A request head poise refuses: answer ``status`` and close the connection."""

    __slots__ = ("message", "status")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"Rejection({self.status}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejection) and (other.status, other.message) == (
            self.status,
            self.message,
        )

    def __hash__(self) -> int:
        return hash((self.status, self.message))


BAD: Final = Rejection(400, "Bad Request")


def parse_request(data: bytes, s: Settings) -> RequestHead | Rejection:
    """``data``: one whole request head, ending with the empty line (b"\\r\\n\\r\\n")."""
    line = _request_line(data, s)
    if isinstance(line, Rejection):
        return line
    lines, method, target, http10 = line
    if len(lines) - 1 > s.max_headers:
        return Rejection(431, "Request Header Fields Too Large")
    out = RequestHead()
    out.method = method
    out.http10 = http10
    f = _read_fields(lines, s, out)
    if isinstance(f, Rejection):
        return f
    if f.host is None and not http10:
        return BAD
    place = _origin(method, target, f.host)
    if isinstance(place, Rejection):
        return place
    out.target, host = place
    out.host = host
    headers = http.drop_nominated(f.headers, f.tokens) if f.tokens else f.headers
    out.headers = headers
    out.keep_alive = b"keep-alive" in f.tokens if http10 else b"close" not in f.tokens
    framing = _framing(out, f, s)
    if isinstance(framing, Rejection):
        return framing
    upgrade = f.upgrade
    if upgrade is not None and method == b"GET" and not http10 and b"upgrade" in f.tokens:
        out.upgrade = upgrade
        framing += b"Connection: Upgrade\r\nUpgrade: " + upgrade + CRLF
    out.head = b"".join(
        (method, b" ", out.target, b" HTTP/1.1\r\n", *_forwarding(s, f.fwd, host, headers),
         s.tls_fields, framing, CRLF)
    )  # fmt: skip
    return out


def _request_line(data: bytes, s: Settings) -> tuple[list[bytes], bytes, bytes, bool] | Rejection:
    """The head's lines (request line first), method, target and whether it is HTTP/1.0."""
    start = 0
    while data[start : start + 2] == CRLF:  # empty lines before the request line
        start += 2
    if len(data) - start > s.max_header_bytes:
        return Rejection(431, "Request Header Fields Too Large")
    end = data.find(b"\r\n\r\n", start)
    if end < 0 or end + 4 != len(data):
        return BAD
    lines = data[start:end].split(CRLF)
    for line in lines:
        if line.find(b"\n") >= 0 or line.find(b"\r") >= 0:
            return BAD  # a bare CR or LF
    m = _LINE.fullmatch(lines[0])
    if m is None:
        parts = lines[0].split(b" ")
        if len(parts) > 1 and len(parts[1]) > s.max_target:
            return Rejection(414, "URI Too Long")
        return BAD  # HTTP/0.9, doubled spaces, a tab, a lower-case version...
    method, target, major, minor = m.group(1), m.group(2), m.group(3), m.group(4)
    if method not in METHODS:
        return BAD
    if len(target) > s.max_target:
        return Rejection(414, "URI Too Long")
    if major == b"2" and minor == b"0":
        return Rejection(505, "HTTP Version Not Supported")
    if major != b"1" or minor not in (b"0", b"1"):
        return BAD
    return lines, method, target, minor == b"0"


class _Fields:
    """What a head's fields say: the fields forwarded as they are, and the ones poise
    reads."""

    __slots__ = ("cl", "fwd", "headers", "host", "te", "tokens", "upgrade")

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        self.host: bytes | None = None
        self.cl: bytes | None = None
        self.te: bytes | None = None
        self.tokens: list[bytes] = []  # Connection's
        self.fwd: list[tuple[bytes, bytes, bytes]] = []
        self.upgrade: bytes | None = None


def _read_fields(lines: list[bytes], s: Settings, out: RequestHead) -> _Fields | Rejection:
    f = _Fields()
    for line in lines[1:]:
        m = _FIELD.fullmatch(line)
        if m is None:
            return BAD  # obs-fold, whitespace before the colon, a bad byte
        name, value = m.group(1), m.group(2)
        lname = name.lower()
        kind = http.REQUEST_HEADER_KIND.get(lname, http.PLAIN)
        if kind == http.PLAIN:
            if name.find(b"_") >= 0 or lname in s.drop:
                continue
            if lname == b"expect" and value.lower() == b"100-continue":
                out.expect_continue = True
            f.headers += (name, b": ", value, CRLF)
        elif kind == http.HOST:
            if f.host is not None or not http.HOST_RE.fullmatch(value):
                return BAD
            f.host = value
        elif kind == http.CONTENT_LENGTH:
            if f.cl is not None or not http.CONTENT_LENGTH_RE.fullmatch(value):
                return BAD
            f.cl = value
        elif kind == http.TRANSFER_ENCODING:
            f.te = value if f.te is None else f.te + b"," + value
        elif kind == http.CONNECTION:
            f.tokens += http.connection_tokens(value)
        elif kind == http.FORWARDED:
            f.fwd.append((lname, name, value))
        elif lname == b"upgrade":
            f.upgrade = value
    return f


def _origin(method: bytes, target: bytes, host: bytes | None) -> tuple[bytes, bytes] | Rejection:
    """The target in origin form and the host (an absolute-form target's authority wins
    over Host, RFC 9112 §3.2.2)."""
    if target[:1] != b"/":
        low = target[:8].lower()
        if low.startswith(b"http://") or low.startswith(b"https://"):
            rest = target[target.index(b"//") + 2 :]
            cut = len(rest)
            for sep in (b"/", b"?"):
                i = rest.find(sep)
                if 0 <= i < cut:
                    cut = i
            authority, path = rest[:cut], rest[cut:]
            if not authority or not http.HOST_RE.fullmatch(authority):
                return BAD
            host = authority
            target = path if path[:1] == b"/" else b"/" + path
        elif method == b"CONNECT":
            return Rejection(405, "Method Not Allowed")
        elif target != b"*" or method != b"OPTIONS":
            return BAD
    if not target.isascii() or target.find(b"\\") >= 0 or target.find(b"#") >= 0:
        return BAD
    return target, host or b""


def _framing(out: RequestHead, f: _Fields, s: Settings) -> bytes | Rejection:
    """How the body is framed towards the backend: its framing field."""
    te, cl = f.te, f.cl
    if te is not None:
        if out.http10 or cl is not None:
            return BAD
        codings = http.connection_tokens(te)
        if codings != [b"chunked"]:
            if b"chunked" in codings:
                return BAD
            return Rejection(501, "Not Implemented")
        out.chunked = True
        return b"Transfer-Encoding: chunked\r\n"
    if cl is not None:
        out.content_length = n = int(cl)
        if s.max_body_size and n > s.max_body_size:
            return Rejection(413, "Content Too Large")
        return b"Content-Length: " + cl + CRLF
    return b""


def _forwarding(
    s: Settings, fwd: list[tuple[bytes, bytes, bytes]], host: bytes, headers: list[bytes]
) -> list[bytes]:
    """Host, the client's fields, then the forwarding fields (as request.forwarding_fields)."""
    proto = b"https" if s.https else b"http"
    out = [b"Host: ", host, CRLF] if host else []
    out += headers
    got = http.gather_forwarding(out, fwd, s.x_forwarded, s.forwarded)
    if not s.trusted:
        got = {}
    http.add_forwarding(
        out, got, s.peer, proto, host, x_forwarded=s.x_forwarded, forwarded=s.forwarded,
        via=s.via,
    )  # fmt: skip
    return out
