"""Header rules and pre-encoded bytes shared by the client and upstream protocols.

Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions, together with every
field the ``Connection`` header nominates; framing headers are re-emitted by poise itself
(RFC 9112 §6), never copied.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

# What a header name means to the proxy. Names absent from these maps are copied as they are.
PLAIN: Final = 0  # forwarded as it is
HOST: Final = 1
CONTENT_LENGTH: Final = 2
TRANSFER_ENCODING: Final = 3
CONNECTION: Final = 4
HOP: Final = 5  # dropped
FORWARDED: Final = 6  # X-Forwarded-*: replaced by ours when x_forwarded is on

REQUEST_HEADER_KIND: Final[dict[bytes, int]] = {
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
    b"forwarded": FORWARDED,
}

# Response fields poise must see, found in the lower-cased raw head ("\r\nname:"). llhttp
# rejects whitespace before the colon, so the name is always followed by it directly.
RESPONSE_SCAN_RE: Final = re.compile(
    rb"\r\n(?:c(?:ontent-length|onnection)|transfer-encoding|keep-alive|proxy-(?:connection"
    rb"|authenticate)|trailer|upgrade):"
)
CL_ONLY: Final = [b"\r\ncontent-length:"]
CL_CONNECTION: Final = [b"\r\ncontent-length:", b"\r\nconnection:"]
CONNECTION_CL: Final = [b"\r\nconnection:", b"\r\ncontent-length:"]
PLAIN_CONNECTION: Final = (b"keep-alive", b"close")
RESPONSE_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
    }
)

# RFC 9110 §8.6: 1*DIGIT. Bounded so int() never sees something huge or odd (no signs,
# underscores, spaces or non-ASCII digits, which Python's int() would all accept).
CONTENT_LENGTH_RE: Final = re.compile(rb"[0-9]{1,18}")
# a token list element of the Connection header
_TOKEN_SPLIT: Final = re.compile(rb"[ \t]*,[ \t]*")
# RFC 9110 §7.2 host = uri-host [ ":" port ]; reg-name or IPv4 or bracketed IPv6, no userinfo
HOST_RE: Final = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def connection_tokens(value: bytes) -> list[bytes]:
    return [t for t in _TOKEN_SPLIT.split(value.strip().lower()) if t]


def has_field(headers: list[bytes], lname: bytes) -> bool:
    """Whether the flat field list (name, b": ", value, CRLF, ...) has a field ``lname``."""
    return any(name.lower() == lname for name in headers[0::4])


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


def strip_hop_fields(block: bytes, low: bytes) -> tuple[bytes, bytes | None]:
    """Remove hop-by-hop fields, and the fields ``Connection`` names, from a raw header block
    ("\\r\\nName: value" lines; ``low`` is it lower-cased). Returns the block and the
    Transfer-Encoding value (comma-joined when repeated), or None."""
    lines = block.split(b"\r\n")
    lows = low.split(b"\r\n")
    names = [ln.partition(b":")[0] for ln in lows]
    dropped = set(RESPONSE_HOP)
    te: bytes | None = None
    for name, ln in zip(names, lows, strict=True):
        if name == b"connection":
            dropped.update(connection_tokens(ln.partition(b":")[2]))
        elif name == b"transfer-encoding":
            v = ln.partition(b":")[2].strip(b" \t")
            te = v if te is None else te + b"," + v
    dropped.discard(b"content-length")  # framing is not for the peer to remove
    kept = [line for line, name in zip(lines[1:], names[1:], strict=True) if name not in dropped]
    return b"".join(b"\r\n" + line for line in kept), te


def client_address(
    peer: str,
    forwarded_for: Sequence[str],
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """Who the client is, by the rightmost-untrusted rule.

    Walk the chain ``X-Forwarded-For, ..., peer`` from the right, skipping trusted proxies;
    the first address not trusted is the client. Anything left of it was written by that
    client and proves nothing, so limits and hashing must never key on the leftmost value.
    ``forwarded_for`` holds the header's values in order (each may be a comma list)."""
    chain = [a.strip() for v in forwarded_for for a in v.split(",") if a.strip()]
    chain.append(peer)
    for addr in reversed(chain):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return addr  # not an address: not a proxy we trust, so it is where trust ends
        if not any(ip in net for net in trusted):
            return addr
    return chain[0]  # every hop trusted: the leftmost is as far as anyone can tell


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


def field_value(low_block: bytes, lname: bytes) -> bytes:
    """The first ``lname`` field's value in a lower-cased raw header block (b"" if absent)."""
    i = low_block.find(b"\r\n" + lname + b":")
    if i < 0:
        return b""
    j = low_block.find(b"\r\n", i + 2)
    return low_block[i + len(lname) + 3 : j if j >= 0 else len(low_block)].strip(b" \t")


def retry_after_seconds(value: bytes, now: float | None = None) -> float | None:
    """Retry-After (RFC 9110 §10.2.3): delay-seconds or an HTTP-date; None when unusable.
    ``now`` is the wall clock (for dates), read when not given."""
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return delay if delay > 0 else None


def gather_forwarding(
    out: list[bytes],
    fwd: Iterable[tuple[bytes, bytes, bytes]],
    x_forwarded: bool,
    forwarded: bool,
) -> dict[bytes, bytes]:
    """The client's forwarding fields (lower-cased name, name, value) that poise judges,
    joined by name; those it does not (``x_forwarded``/``forwarded`` off: someone else owns
    them) are appended to ``out`` as they came."""
    got: dict[bytes, bytes] = {}
    for lname, name, value in fwd:
        if not x_forwarded and (lname != b"forwarded" or not forwarded):
            out += (name, b": ", value, b"\r\n")  # not ours to judge: passed through
        elif lname in got:
            got[lname] += b", " + value
        else:
            got[lname] = value
    return got


def add_forwarding(
    out: list[bytes],
    got: dict[bytes, bytes],
    peer: bytes,
    proto: bytes,
    host: bytes,
    *,
    x_forwarded: bool,
    forwarded: bool,
    via: bool,
) -> None:
    """Append X-Forwarded-*, Forwarded and Via to ``out``: ``got`` holds what a trusted proxy
    sent before (appended to or kept), empty for anyone else (replaced)."""
    if x_forwarded:
        xff = got.get(b"x-forwarded-for")
        out += (b"X-Forwarded-For: ", xff + b", " + peer if xff else peer, b"\r\n")
        out += (b"X-Forwarded-Proto: ", got.get(b"x-forwarded-proto", proto), b"\r\n")
        fhost = got.get(b"x-forwarded-host", host)
        if fhost:
            out += (b"X-Forwarded-Host: ", fhost, b"\r\n")
    if forwarded:
        node = b'"[' + peer + b']"' if b":" in peer else peer
        element = b"for=" + node + b";proto=" + proto
        if host:
            element += b';host="' + host + b'"'
        prior = got.get(b"forwarded")
        out += (b"Forwarded: ", prior + b", " + element if prior else element, b"\r\n")
    if via:
        out.append(b"Via: 1.1 poise\r\n")
