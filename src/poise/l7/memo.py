"""The repeated request head: a head that comes again as the same bytes gives the same
result, so what poise made of it is kept and given again (``RequestMemo``).

A connection's reader keeps the last bodiless head it parsed or scanned (``memo``) and how
many heads in a row since were other ones (``misses``): after ``MEMO_MISSES`` of them, heads
stop being remembered, so a client whose heads all differ pays nothing more for the memo.
The last head per listener, peer and TLS fields also serves the first read of a new
connection with those (``Context.first_heads``): a client that opens one connection per
request (Connection: close) sends the same head on each. The response side's memo is
``response.ResponseMemo``.

Functions over the reader's two fields rather than an object of their own: a new connection
then costs no allocation for the memo (bench/hotpath.py --new-connections).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from poise.l7.request import Exchange

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection
    from poise.l7.context import Context
    from poise.l7.reader import RequestReader

MEMO_MAX: Final = 1024  # bytes: a longer request head is not remembered (memory per connection)
MEMO_MISSES: Final = 4  # heads in a row that were not the remembered one: stop remembering
FIRST_HEADS_MAX: Final = 256  # (listener, peer) pairs whose last head new connections may reuse


class RequestMemo:
    """A bodiless request head as the client sent it (``raw``, one whole read) and what poise
    made of it. A keep-alive client that sends the very same head again (a poller, a
    health checker, a load generator) gets it from here instead of parsing and rebuilding it
    again: the same bytes, under the same settings (``generation``) and on the same
    connection (its peer and TLS fields are the same), give the same result. The last one
    remembered per listener, peer and TLS fields also serves the first read of the next
    connection with those (``Context.first_heads``): a client that opens a connection per
    request sends the same head on each."""

    __slots__ = (
        "client_ip", "fields", "generation", "head", "headers", "host", "is_head", "keep_alive",
        "method", "raw", "target",
    )  # fmt: skip

    def __init__(self, raw: bytes, generation: int, ex: Exchange) -> None:
        self.raw = raw
        self.generation = generation
        self.method = ex.method
        self.target = ex.target
        self.host = ex.host
        self.head = ex.head
        self.keep_alive = ex.keep_alive
        self.is_head = ex.is_head
        self.headers = ex.headers
        self.fields = ex.fields
        self.client_ip = ex.client_ip

    def exchange(self) -> Exchange:
        """A new Exchange for the request, complete (it has no body)."""
        ex = Exchange()
        ex.method = self.method
        ex.target = self.target
        ex.host = self.host
        ex.head = self.head
        ex.keep_alive = self.keep_alive
        ex.is_head = self.is_head
        ex.headers = self.headers
        ex.fields = self.fields
        ex.client_ip = self.client_ip
        ex.request_done = True
        return ex


def recall(
    reader: RequestReader, data: bytes, ctx: Context, client: ClientConnection, parsing: bool
) -> RequestMemo | None:
    """The remembered head ``data`` is, read between requests while ``parsing`` (the reader
    still reads requests); on a connection's first read, one remembered for the same
    listener, peer and TLS fields (the key holds all that the head is built from)."""
    memo = reader.memo
    if memo is None:
        first = ctx.first_heads.get((client.listener, client.peer, client.tls_fields))
        if (
            first is not None
            and data == first.raw
            and parsing
            and first.generation == ctx.generation
        ):
            reader.memo = first
            return first
        return None
    if data == memo.raw and parsing and memo.generation == ctx.generation:
        reader.misses = 0
        return memo
    reader.misses += 1
    return None


def remember(reader: RequestReader, data: bytes, ctx: Context, client: ClientConnection) -> None:
    """``data`` was one whole request head, parsed or scanned (the last of the client's
    queue), and the reader still reads requests: keep what poise made of it, if the head is
    short and the request plain enough (no body, HTTP/1.1, no upgrade, not refused)."""
    if (
        len(data) > MEMO_MAX
        or reader.misses >= MEMO_MISSES
        or data[-4:] != b"\r\n\r\n"
        or not client.queue
    ):
        return
    ex = client.queue[-1]
    if ex.has_body or ex.http10 or ex.upgrade is not None or ex.error is not None:
        return
    reader.memo = memo = RequestMemo(data, ctx.generation, ex)
    first = ctx.first_heads
    if len(first) >= FIRST_HEADS_MAX:
        first.clear()
    first[(client.listener, client.peer, client.tls_fields)] = memo
