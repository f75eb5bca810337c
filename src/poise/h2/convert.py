"""HTTP/2 messages to and from the HTTP/1.1 poise forwards: pure functions.

A request's header list becomes the pieces of an HTTP/1.1 request head (RFC 9113 §8.3,
RFC 9110 §7.6.1), refusing what a proxy must not pass on (RFC 9113 §8.2): an upper-case or
invalid field name, a value with CR, LF or NUL or with whitespace at either end, a
pseudo-header that is unknown, repeated, missing or after a regular field, a
connection-specific field (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding,
Upgrade), TE other than ``trailers``, a Host that names another authority than
``:authority``, CONNECT. Cookie crumbs are joined with ``; `` (§8.2.3).

A response head as poise's HTTP/1.1 side made it (l7/upstream.py, already rewritten) becomes
a status and a header list: connection-specific fields are dropped, names lower-cased.
"""

from __future__ import annotations

import re
from typing import Final

from poise.l7 import http
from poise.l7.request import Reject

CRLF: Final = b"\r\n"

# RFC 9110 §5.6.2 tchar, lower case only (RFC 9113 §8.2.1: upper case is malformed)
_NAME_RE: Final = re.compile(rb"[a-z0-9!#$%&'*+.^_`|~-]+")
# a field value: no CR, LF or NUL anywhere, no whitespace at either end (RFC 9113 §8.2.1),
# and, since it goes on in HTTP/1.1, no other control character but HTAB (RFC 9110 §5.5:
# what an HTTP/1.1 parser such as llhttp refuses is never forwarded)
_BAD_VALUE_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")
# a request target on the HTTP/1.1 request line: visible ASCII, no space (RFC 9112 §3.2)
_TARGET_RE: Final = re.compile(rb"[\x21-\x7e]+")
_METHOD_RE: Final = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
# methods whose empty body is declared (HTTP/1.1 servers expect a length on these)
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})


class Request:
    """What ``request`` made of a header list."""

    __slots__ = (
        "authority", "content_length", "content_type", "fields", "fwd", "grpc_timeout", "method",
        "target",
    )  # fmt: skip

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.authority = b""
        self.fields: list[bytes] = []  # name, b": ", value, CRLF, repeated
        self.content_length: bytes | None = None
        self.fwd: list[tuple[bytes, bytes, bytes]] | None = None  # X-Forwarded-*, Forwarded
        self.content_type: bytes | None = None  # (gRPC is told by it)
        self.grpc_timeout: bytes | None = None


def request(
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...],
    kinds: dict[bytes, int],
    *,
    max_target: int,
    max_fields: int,
) -> Request:
    """The request a header list asks for; raises ``Reject`` (400, 405, 414, 431)."""
    if len(headers) > max_fields:
        raise Reject(431, "Request Header Fields Too Large")
    pseudo: dict[bytes, bytes] = {}
    i = 0
    n = len(headers)
    while i < n and headers[i][0][:1] == b":":
        name, value = headers[i]
        if name not in _PSEUDO or name in pseudo or not value:
            raise Reject(400, "Bad Request")
        if _BAD_VALUE_RE.search(value) is not None:
            raise Reject(400, "Bad Request")
        pseudo[name] = value
        i += 1
    req = Request()
    host = _regular(req, headers[i:], kinds)
    _line(req, pseudo, host, max_target)
    return req


def _regular(
    req: Request,
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...],
    kinds: dict[bytes, int],
) -> bytes | None:
    """The regular fields into ``req.fields`` (and the framing and forwarding ones into
    their places); the Host field's value, if one came."""
    fields = req.fields
    host: bytes | None = None
    cookies: list[bytes] = []
    for name, value in headers:
        if _NAME_RE.fullmatch(name) is None or _BAD_VALUE_RE.search(value) is not None:
            raise Reject(400, "Bad Request")  # (a pseudo-header after a field too)
        if name in CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise Reject(400, "Bad Request")
        kind = kinds.get(name, http.PLAIN)
        if name == b"cookie":
            cookies.append(value)
        elif kind == http.PLAIN:
            if name.find(b"_") < 0:  # with "_": dropped, as on HTTP/1.1 (l7/reader.py)
                fields += (name, b": ", value, CRLF)
                if name == b"content-type":
                    req.content_type = value
                elif name == b"grpc-timeout":
                    req.grpc_timeout = value
        elif kind == http.HOST:
            if host is not None:
                raise Reject(400, "Bad Request")
            host = value
        elif kind == http.CONTENT_LENGTH:
            if not http.CONTENT_LENGTH_RE.fullmatch(value) or req.content_length not in (
                None,
                value,
            ):
                raise Reject(400, "Bad Request")
            req.content_length = value
        elif kind == http.FORWARDED:
            if req.fwd is None:
                req.fwd = []
            req.fwd.append((name, name, value))
        # HOP (TE: trailers among them, and a listener's client-subject header): dropped
    if cookies:
        fields += (b"cookie", b": ", b"; ".join(cookies), CRLF)
    return host


def _line(req: Request, pseudo: dict[bytes, bytes], host: bytes | None, max_target: int) -> None:
    """The request line and authority from the pseudo-headers (RFC 9113 §8.3.1)."""
    method = pseudo.get(b":method")
    if method == b"CONNECT":
        raise Reject(405, "Method Not Allowed")
    path = pseudo.get(b":path")
    scheme = pseudo.get(b":scheme")
    if method is None or path is None or scheme not in (b"http", b"https"):
        raise Reject(400, "Bad Request")
    if _METHOD_RE.fullmatch(method) is None:
        raise Reject(400, "Bad Request")
    if len(path) > max_target:
        raise Reject(414, "URI Too Long")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise Reject(400, "Bad Request")
    if _TARGET_RE.fullmatch(path) is None or path.find(b"\\") >= 0 or path.find(b"#") >= 0:
        raise Reject(400, "Bad Request")  # as on HTTP/1.1: docs/http-rules.md
    authority = pseudo.get(b":authority")
    if authority is None:
        authority = host
    elif host is not None and host.lower() != authority.lower():
        raise Reject(400, "Bad Request")  # a Host naming another authority
    if authority is None or http.HOST_RE.fullmatch(authority) is None:
        raise Reject(400, "Bad Request")  # (no userinfo: RFC 9113 §8.3.1)
    req.method = method
    req.target = path
    req.authority = authority


def framing(req: Request, *, body: bool) -> tuple[bytes, bool]:
    """The framing line of the HTTP/1.1 request head and whether its body goes chunked:
    the client's Content-Length when it gave one; chunked for a body of unknown length;
    ``Content-Length: 0`` for a POST, PUT or PATCH without a body."""
    cl = req.content_length
    if cl is not None:
        return b"Content-Length: " + cl + CRLF, False
    if body:
        return b"Transfer-Encoding: chunked\r\n", True
    if req.method in _BODY_METHODS:
        return b"Content-Length: 0\r\n", False
    return b"", False


_SEEN: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}
SEEN_MAX: Final = 512  # response heads remembered (a backend's repeat within its Date's second)


def response(head: bytes | memoryview) -> tuple[int, list[tuple[bytes, bytes]]]:
    """``HTTP/1.1 <status> ...`` and its fields, ending in an empty line, as poise's
    HTTP/1.1 side made it: the status and the HTTP/2 header list (``:status`` first).
    The same head gives the same answer, so recent ones are remembered (the list is shared:
    callers do not change it)."""
    raw = bytes(head)
    known = _SEEN.get(raw)
    if known is not None:
        return known
    got = _response(raw)
    if len(_SEEN) >= SEEN_MAX:
        _SEEN.clear()
    _SEEN[raw] = got
    return got


def _response(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = raw.split(CRLF)
    status = int(lines[0][9:12])
    out: list[tuple[bytes, bytes]] = [(b":status", lines[0][9:12])]
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        low = name.lower()
        if low in CONNECTION_SPECIFIC:
            continue
        out.append((low, value.strip(b" \t")))
    return status, out
