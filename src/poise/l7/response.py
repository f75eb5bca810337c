"""Response heads towards the client: the rewrite of a backend's head, what poise adds to
it per request, and the pieces the upstream protocol forwards a response with.

Pure functions over bytes (no I/O but ``send_out``'s one write): the upstream protocol
(l7/upstream.py) calls them once per response head.

The rewrite (RFC 9110 §7.6.1): the status line says HTTP/1.1 whatever the backend's
version; hop-by-hop fields and the fields ``Connection`` nominates are dropped; the framing
is declared again by the caller (Content-Length kept, or chunked, or close-delimited).
The common shape (Content-Length and ``Connection: keep-alive``) takes one regular
expression pass and one slice.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from poise.l7 import http

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection
    from poise.l7.context import Context
    from poise.l7.request import Exchange
    from poise.models import Backend

COUNT_FROM: Final = 16 * 1024  # body bytes in the head's read above which llhttp is stopped
MEMO_MAX: Final = 2048  # bytes: a longer response head is not remembered (memory per connection)
MEMO_MISSES: Final = 4  # responses in a row that were not the remembered one: stop remembering

# how a response body travels to the client
BODY_NONE: Final = 0
BODY_RAW: Final = 1  # bytes as they are (Content-Length, or close-delimited to an HTTP/1.0 client)
BODY_CHUNK: Final = 2  # re-chunked
BODY_TUNNEL: Final = 3  # 101 Switching Protocols: the connection becomes a tunnel


class BadResponse(Exception):
    """Raised inside a parser callback: the backend broke HTTP/1.1."""


def content_length(low_block: bytes) -> int:
    i = low_block.find(b"\r\ncontent-length:")
    j = low_block.find(b"\r\n", i + 2)
    return int(low_block[i + 17 : j if j >= 0 else len(low_block)].strip(b" \t"))


class ResponseMemo:
    """A response head a backend sent (``head``, raw) and what poise made of it: its status,
    the rewritten status line and fields (without what poise adds per request, see
    head_tail) and its Content-Length. When the same head comes again on the
    connection (a backend answering the same request the same way within the second of its
    Date field), it is taken from here instead of parsed and rewritten again: the same bytes
    give the same result. Only plain responses are kept: a status below 500 with a
    Content-Length body, keep-alive."""

    __slots__ = ("head", "length", "rewritten", "status")

    def __init__(self, head: bytes, status: int, rewritten: bytes, length: int) -> None:
        self.head = head
        self.status = status
        self.rewritten = rewritten
        self.length = length

    def fits(self, data: bytes, ex: Exchange) -> bool:
        """Whether the response starting ``data`` to ``ex`` is this one: the same head, to
        a request that is not HEAD, and not a status its group retries."""
        group = ex.group
        return (
            data.startswith(self.head)
            and not ex.is_head
            and group is not None
            and self.status not in group.retry_statuses
        )


def rewrite_head(
    buf: bytes, start: int, eol: int, end: int
) -> tuple[bytes, bytes, bytes, bool, bytes | None]:
    """The response head in ``buf`` (status line from ``start`` to ``eol``, fields to
    ``end``), validated by llhttp, rewritten from its raw bytes: (status line, fields
    without hop-by-hop ones, the original fields lower-cased, whether it has a
    Content-Length, its Transfer-Encoding value or None). Fields are "\\r\\nName: value"."""
    block = buf[eol:end]
    low = block.lower()
    found = http.RESPONSE_SCAN_RE.findall(low)
    te: bytes | None = None
    if found in (http.CL_CONNECTION, http.CONNECTION_CL):
        # The most common shape (nginx, most servers): drop "Connection: keep-alive".
        i = low.find(b"\r\nconnection:")
        j = low.find(b"\r\n", i + 2)
        if j < 0:
            j = len(low)
        if low[i + 13 : j].strip(b" \t") in http.PLAIN_CONNECTION:
            block = block[:i] + block[j:]
        else:
            block, te = http.strip_hop_fields(block, low)
        has_cl = True
    elif not found:
        has_cl = False
    elif found == http.CL_ONLY:
        has_cl = True
    else:
        has_cl = b"\r\ncontent-length:" in found
        block, te = http.strip_hop_fields(block, low)
    if buf.startswith(b"HTTP/1.1 ", start):
        line = buf[start:eol]
    else:
        line = b"HTTP/1.1" + buf[start + 8 : eol]
    return line, block, low, has_cl, te


def framing(
    ex: Exchange, has_cl: bool, te: bytes | None, *, no_body: bool
) -> tuple[int, bytes, bool]:
    """How a response body travels to the client: (mode, the framing field for the head,
    whether the backend ends it by closing). RFC 9112 §7.1: no chunked to an HTTP/1.0
    client, which then gets the body close-delimited and loses keep-alive; an HTTP/2
    client's stream (``ex.unframed``) gets the bytes as they are."""
    if has_cl or no_body:
        return (BODY_NONE if no_body else BODY_RAW), b"", False
    if te is not None and http.connection_tokens(te)[-1:] != [b"chunked"]:
        raise BadResponse("unsupported transfer coding")
    if ex.unframed:  # HTTP/2: DATA frames carry it, END_STREAM ends it
        return BODY_RAW, b"", te is None
    if ex.http10:
        ex.keep_alive = False  # the end of the body is the end of the connection
        return BODY_RAW, b"", te is None
    return BODY_CHUNK, b"\r\nTransfer-Encoding: chunked", te is None


def upgrade_head(line: bytes, block: bytes, low: bytes, raw: bytes) -> bytes:
    """A 101 Switching Protocols head for the client: the rewritten ``line`` and ``block``
    and the backend's Upgrade value (read from ``raw``, the original fields, at its place in
    ``low``)."""
    i = low.find(b"\r\nupgrade:")
    if i < 0:
        raise BadResponse("101 without an Upgrade header")
    j = low.find(b"\r\n", i + 2)
    value = raw[i + 10 : j if j >= 0 else len(low)].strip(b" \t")
    return line + block + b"\r\nConnection: Upgrade\r\nUpgrade: " + value + b"\r\n\r\n"


def head_tail(
    ctx: Context, backend: Backend, ex: Exchange, client: ClientConnection, tail: bytes
) -> bytes:
    """The end of a response head towards the client: ``tail`` (the framing), the fields
    poise adds, and how the connection goes on."""
    if ctx.x_forwarded_server:
        tail += b"\r\nX-Forwarded-Server: " + backend.authority.encode()
    if ctx.via:
        tail += b"\r\nVia: 1.1 poise"
    sticky = ex.sticky
    if sticky is not None and ex.sticky_key != sticky.values[backend.index]:
        tail += b"\r\nSet-Cookie: " + sticky.set_cookie(backend)
    # a client that half-closed gets "close" with the last response it is owed
    if not ex.keep_alive or (client.close_after and len(client.queue) <= 1) or ctx.draining:
        ex.keep_alive = False
        tail += b"\r\nConnection: close\r\n\r\n"
    elif ex.http10:
        tail += b"\r\nConnection: keep-alive\r\n\r\n"
    else:
        tail += b"\r\n\r\n"
    return tail


def stray_bytes(rest: bytes | memoryview) -> bool:
    """Bytes after a response that make its connection unusable: anything but the empty
    lines llhttp skips between messages (some servers end a body with an extra CRLF)."""
    return bytes(rest).strip(b"\r\n") != b""


def send_out(transport: asyncio.Transport, out: list[bytes | memoryview]) -> None:
    """One write per read. Small pieces are joined (one contiguous buffer is cheaper than a
    writev); large body chunks go as they are, without a copy."""
    if len(out) == 1:
        transport.write(out[0])
    elif len(out[-1]) < 16384:
        transport.write(b"".join(out))
    else:
        transport.writelines(out)
