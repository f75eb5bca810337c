"""One request on its way through the proxy: the Exchange record, and the pure pieces of
the request head poise rebuilds (forwarding fields, absolute-form targets).

Kept apart from the protocol class in client.py, which owns the byte stream and the
exchange lifecycle; everything here is a plain function of its arguments.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from poise.l7 import http
from poise.selection import release

if TYPE_CHECKING:
    from poise.balancing import Load, StickyPick
    from poise.l7.context import Context
    from poise.l7.upstream import UpstreamConnection
    from poise.models import Backend
    from poise.routing import Group
    from poise.tls.contexts import ListenerTls
    from poise.upstream.limits import Admission

CRLF: Final = b"\r\n"


class Reject(Exception):
    """Raised inside a parser callback to refuse the request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Exchange:
    """One request and its response.

    No ``__slots__`` on purpose: most fields keep their class-level default for the whole
    exchange, and an instance that only stores what differs is three times cheaper to create
    than one that assigns twenty slots (this is made once per request).
    """

    method = b""
    target = b""
    host = b""
    head = b""
    http10 = False
    unframed = False  # the client takes the response body unframed (HTTP/2: no re-chunking)
    grpc = False  # a gRPC request (HTTP/2, content-type application/grpc): gRPC error answers
    keep_alive = True
    is_head = False
    chunked = False
    has_body = False
    pending: tuple[bytes, ...] = ()  # body pieces held until a backend connection is attached
    pending_bytes = 0
    body_bytes = 0  # request body bytes received so far
    body_started = 0.0  # clock reading when the head was complete, if there is a body
    t0 = 0.0  # Context.clock() at the request's first byte (request duration metric)
    local = False  # poise answered itself (an error), the backend did not
    body_out: int | None = None  # response body bytes by Content-Length (access log)
    request_done = False
    response_done = False
    response_started = False
    started = False
    error: bytes | None = None  # a canned response to send instead of proxying
    conn: UpstreamConnection | None = None  # its backend connection, once it has one
    group: Group | None = None
    backend: Backend | None = None
    tried: tuple[Backend, ...] = ()
    # attempts whose backend could not be reached (connect refused or timed out): nothing was
    # sent to it. When every attempt failed so, no server could take the request: 503, not
    # 502 (attempts.none_left). A failed TLS handshake is not counted: that backend
    # answered, badly.
    unreachable = 0
    stale_retries = 0
    upgrade: bytes | None = None  # the Upgrade value forwarded (a WebSocket handshake, say)
    # the request's fields, flat (name, b": ", value, CRLF, ...); read them with field_list()
    headers: list[bytes] = []
    # a plain head's forwarded fields as they came ("Name: value\r\n" each, see l7/scan.py),
    # until field_list() splits them into ``headers`` (most requests never need that)
    fields: bytes | None = None
    client_ip: bytes | None = None  # the client address from a trusted proxy's chain
    status = 0  # the backend's final status
    load: Load | None = None  # the group's load, while this exchange counts in it
    sticky: StickyPick | None = None  # set: the response may need to (re)pin the client
    sticky_key: bytes | None = None
    sent_at = 0.0
    kept: list[bytes] | None = None  # body pieces as sent, kept so a retry can send them again
    retrying = False  # counts in the worker's retry budget until it ends
    admission: Admission | None = None  # the group's limits, while this exchange holds a slot
    queued_until = 0.0  # waiting for a slot since (a deadline): see upstream/limits.py
    # retry.timeout: no try (nor wait for a response head) goes past this clock reading;
    # set when the first try connects or sends (0.0: not tried yet)
    until = 0.0

    def __repr__(self) -> str:
        return f"Exchange({self.method.decode()} {self.target[:80]!r})"


def field_list(ex: Exchange) -> list[bytes]:
    """The request's fields, flat: name, b": ", value, CRLF, repeated. A plain head's
    (``ex.fields``) are split on first use: only hashing on a header or cookie, a retry's
    Idempotency-Key check and the combined access log read them."""
    fields = ex.fields
    if fields is not None:
        ex.fields = None
        out: list[bytes] = []
        for line in fields.split(CRLF)[:-1]:  # each line ends with CRLF: the last piece is b""
            name, _, value = line.partition(b": ")  # a name holds no colon
            out += (name, b": ", value, CRLF)
        ex.headers = out
    return ex.headers


def forwarding_fields(
    ctx: Context,
    ex: Exchange,
    *,
    peer: bytes,
    trusted: bool,
    fwd: list[tuple[bytes, bytes, bytes]] | None,
    host: bytes,
    headers: list[bytes],
    https: bool = False,
) -> list[bytes]:
    """Host, the client's fields, then the forwarding fields (the general path).

    From an untrusted peer X-Forwarded-* and Forwarded are replaced; from a trusted proxy
    (``proxy.trusted_proxies``) X-Forwarded-For and Forwarded are appended to, and
    X-Forwarded-Proto/-Host kept. With ``x_forwarded`` off the client's X-Forwarded-* pass
    through untouched (someone else owns them). ``https``: the client came over TLS."""
    proto = b"https" if https else b"http"
    out = [b"Host: ", host, CRLF] if host else []
    out += headers
    got = http.gather_forwarding(out, fwd or (), ctx.x_forwarded, ctx.forwarded)
    if not trusted:
        got = {}
    elif b"x-forwarded-for" in got:
        addr = http.client_address(
            peer.decode(), [got[b"x-forwarded-for"].decode("latin-1")], ctx.trusted
        )
        ex.client_ip = addr.encode("latin-1")  # hashing on "ip" uses the client, not the proxy
    http.add_forwarding(
        out, got, peer, proto, host, x_forwarded=ctx.x_forwarded, forwarded=ctx.forwarded,
        via=ctx.via,
    )  # fmt: skip
    return out


def origin_form(ex: Exchange, method: bytes, target: bytes) -> bytes:
    """Absolute-form (RFC 9112 §3.2.2): route and forward by the URI's authority."""
    low = target[:8].lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        rest = target[target.index(b"//") + 2 :]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        authority, path = rest[:cut], rest[cut:]
        if not authority or not http.HOST_RE.fullmatch(authority):
            raise Reject(400, "Bad Request")
        ex.host = authority
        ex.target = b"/" + path if path[:1] != b"/" else path
        return ex.target
    if method == b"CONNECT":
        raise Reject(405, "Method Not Allowed")
    if target == b"*" and method == b"OPTIONS":
        return target
    raise Reject(400, "Bad Request")


def request_ended(ex: Exchange) -> bool:
    """The client's request body has ended (HTTP/1.1 or an HTTP/2 stream): the last chunk
    where it goes chunked, and the response's clock starts when a backend has it. False
    when no backend connection has it yet (it is held, or answered already)."""
    ex.request_done = True
    if ex.chunked and not ex.response_done:
        if ex.kept is not None:
            ex.kept.append(b"0\r\n\r\n")
        if ex.conn is not None:
            ex.conn.send((b"0\r\n\r\n",))
        else:
            ex.pending += (b"0\r\n\r\n",)
    if ex.conn is not None:
        ex.conn.request_sent()
        return True
    return False


def connection_fields(
    ctx: Context, transport: Any, tls: ListenerTls | None
) -> tuple[bytes, bool, bytes, bytes]:
    """Per client connection, once (the handshake is over by now): its address, whether it
    is a trusted proxy, the verified client-certificate subject's header line, and the
    X-Forwarded-For/-Proto lines, the same for every request on it."""
    peer = transport.get_extra_info("peername")
    if peer:
        host = str(peer[0])
        addr = host.encode("ascii")
        # (is_trusted says False at once when no proxy is trusted, the usual case)
        trusted = bool(ctx.trusted) and ctx.is_trusted(host)
    else:
        addr = b"unknown"
        trusted = False
    if tls is None:
        return addr, trusted, b"", b"X-Forwarded-For: " + addr + b"\r\nX-Forwarded-Proto: http\r\n"
    tls.count_session(transport)
    subject = tls.subject_field(transport) if tls.subject_header else b""
    forwarded = b"X-Forwarded-For: " + addr + b"\r\nX-Forwarded-Proto: https\r\n" + subject
    return addr, trusted, subject, forwarded


def abandon(ex: Exchange, ctx: Context) -> None:
    """``ex`` will get no (more) response: drop its upstream connection, whose state is now
    unknown, and take it out of the load figures. The client went away or broke the rules,
    so nothing counts against the backend."""
    conn = ex.conn
    if conn is not None:
        ex.conn = None
        conn.abandon()
    if ex.load is not None:
        settle(ex, ok=True)
    if ex.retrying:
        ex.retrying = False
        ctx.retries_active -= 1


def settle(ex: Exchange, *, ok: bool) -> None:
    """Take ``ex`` out of its group's load figures (once), with its latency and outcome."""
    load = ex.load
    if load is not None and ex.backend is not None:
        adm = ex.admission
        ex.load = ex.admission = None
        if load.latency:  # (the clock only for peak EWMA)
            now = time.monotonic()
            latency = now - ex.sent_at
        else:
            now = latency = 0.0
        release(load, adm, ex.backend.index, ok=ok, latency=latency, now=now)


def with_host(head: bytes, backend: Backend) -> bytes:
    """An HTTP/1.0 request head without Host goes out as HTTP/1.1, which requires one
    (RFC 9112 §3.2): it names the backend, as nginx does by default."""
    i = head.index(b"\r\n") + 2
    return head[:i] + b"Host: " + backend.authority.encode() + b"\r\n" + head[i:]
