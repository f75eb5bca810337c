"""Header rules and pre-encoded bytes shared by the client and upstream protocols.

Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions, together with every
field the ``Connection`` header nominates; framing headers are re-emitted by poise itself
(RFC 9112 §6), never copied.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus

# What a header name means to the proxy. Names absent from these maps are copied as they are.
HOST = 1
CONTENT_LENGTH = 2
TRANSFER_ENCODING = 3
CONNECTION = 4
HOP = 5  # dropped
FORWARDED = 6  # X-Forwarded-*: replaced by ours when x_forwarded is on

REQUEST_HEADER_KIND: dict[bytes, int] = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"upgrade": HOP,
    b"proxy-authorization": HOP,
    b"x-forwarded-for": FORWARDED,
    b"x-forwarded-proto": FORWARDED,
    b"x-forwarded-host": FORWARDED,
}

# Response fields poise looks at or drops, matched in the raw head: "\r\nName: value".
# Content-Length is kept (after validation); the others are hop-by-hop and removed.
RESPONSE_SPECIAL_RE = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|keep-alive|proxy-connection|trailer"
    rb"|upgrade|proxy-authenticate)[ \t]*:[ \t]*([^\r\n]*)",
    re.IGNORECASE,
)

# RFC 9110 §8.6: 1*DIGIT. Bounded so int() never sees something huge or odd (no signs,
# underscores, spaces or non-ASCII digits, which Python's int() would all accept).
CONTENT_LENGTH_RE = re.compile(rb"[0-9]{1,18}")
# a token list element of the Connection header
_TOKEN_SPLIT = re.compile(rb"[ \t]*,[ \t]*")
# RFC 9110 §7.2 host = uri-host [ ":" port ]; reg-name or IPv4 or bracketed IPv6, no userinfo
HOST_RE = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def connection_tokens(value: bytes) -> list[bytes]:
    return [t for t in _TOKEN_SPLIT.split(value.strip().lower()) if t]


def drop_nominated(headers: list[bytes], tokens: list[bytes]) -> list[bytes]:
    """Remove the fields a ``Connection`` header names (RFC 9110 §7.6.1). ``headers`` is flat:
    name, b": ", value, CRLF, repeated."""
    names = {t for t in tokens if t not in (b"close", b"keep-alive")}
    if not names:
        return headers
    out: list[bytes] = []
    for i in range(0, len(headers), 4):
        if headers[i].lower() not in names:
            out += headers[i : i + 4]
    return out


def drop_nominated_raw(block: bytes, tokens: list[bytes]) -> bytes:
    """``drop_nominated`` for a raw header block made of "\\r\\nName: value" lines."""
    names = {t for t in tokens if t not in (b"close", b"keep-alive")}
    lines = block.split(b"\r\n")
    kept = [lines[0]] + [
        ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in names
    ]
    return b"\r\n".join(kept)


def host_without_port(host: bytes) -> bytes:
    """Normalised host for routing: lower case, no port, no trailing dot."""
    h = host.lower()
    if h.startswith(b"["):
        end = h.find(b"]")
        h = h[: end + 1]
    else:
        colon = h.rfind(b":")
        if colon >= 0:
            h = h[:colon]
    return h.rstrip(b".")


class DateCache:
    """The Date header value, formatted once per second rather than per response."""

    __slots__ = ("_second", "value")

    def __init__(self) -> None:
        self._second = -1
        self.value = b""
        self.refresh()

    def refresh(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self.value = formatdate(now, usegmt=True).encode("ascii")
        return self.value


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int, reason: bytes = b"") -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``; the standard reason phrase when none is given."""
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            phrase = b"Unknown"
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


def error_response(status: int, message: str, date: bytes, *, close: bool) -> bytes:
    """A complete plain-text error response. The body is a fixed message chosen by poise:
    never request bytes, tracebacks or backend addresses."""
    body = message.encode("utf-8") + b"\n"
    return b"".join(
        (
            status_line(status),
            b"Date: ",
            date,
            b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ",
            str(len(body)).encode("ascii"),
            b"\r\nConnection: close\r\n\r\n" if close else b"\r\n\r\n",
            body,
        )
    )
