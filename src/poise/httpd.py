"""A small HTTP/1.1 server for poise's own JSON APIs (registry, admin): not the proxy.

Theory of operation
-------------------
Control-plane traffic is light per request but can be many requests (thousands of instances
heartbeating), so this is an ``asyncio.Protocol`` fed by httptools (llhttp), like the proxy,
without streams: one request at a time per connection (pipelined requests wait their turn, in
order), keep-alive, and one coarse timer per server for idle connections instead of a timer
per read. Framing is llhttp's: Content-Length and chunked bodies, bodies capped at
``max_body`` (413, by the head when Content-Length says so, before any body is read), heads at
64 KiB (431), anything malformed gets 400 and the connection closes (RFC 9112 §2.2: a server
that cannot parse a request must not guess). Closing after such an early answer is a
lingering close (RFC 9112 §9.6), so a client still sending reads the answer instead of a
reset. ``Expect: 100-continue`` is answered with 100 when the body will be read.

Routes are ``(method, pattern)`` pairs with ``{name}`` segments. A handler returns a ``Reply``
(JSON by default), or a ``Stream`` of chunks sent with chunked framing (long-lived watches),
ended when the client goes away. Errors raised as ``HttpError`` become JSON error replies;
anything else is logged and answered 500 without details (no traceback ever leaves).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import httptools

log = logging.getLogger("poise.httpd")

MAX_HEAD = 64 * 1024
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit between requests
# lingering close after an early error (413 before the body): bytes the client still sends
# are read and discarded, so its socket is not reset before it has read the answer
LINGER_TIME = 5.0  # seconds at most
LINGER_BYTES = 64 * 1024 * 1024  # bytes at most
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def require_bearer(request: Request, token: str) -> None:
    """401 unless ``Authorization: Bearer <token>`` (scheme case-insensitive, constant-time)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        raise HttpError(401, "missing or wrong bearer token")


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    peer: str = ""
    keep_alive: bool = True

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def json(self) -> Any:
        if not self.body:
            return None
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype.lower() != "application/json":  # media types are case-insensitive
            raise HttpError(415, f"body: expected application/json, got {ctype}")
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"body: not valid JSON: {exc}") from exc


@dataclass
class Reply:
    status: int = 200
    data: Any = None  # JSON-encoded unless ``body`` is given
    body: bytes | None = None
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self) -> bytes:
        if self.body is not None:
            return self.body
        return _JSON.encode(self.data).encode() + b"\n"


_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps builds one per call


@dataclass
class Stream:
    chunks: AsyncIterator[bytes]
    content_type: str = "application/x-ndjson"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[..., Awaitable[Reply | Stream]]
# (method, target, headers, keep-alive) -> the whole response, or None: see HttpServer.fast
Fast = Callable[[bytes, bytes, dict[str, str], bool], bytes | None]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self.routes.append((method, re.compile(regex + r"\Z"), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        want = "GET" if method == "HEAD" else method
        for m, regex, handler in self.routes:  # the method first: it is the cheap test
            if m == want and (match := regex.match(path)) is not None:
                return handler, {k: unquote(v) for k, v in match.groupdict().items()}
        allowed = [m for m, regex, _ in self.routes if regex.match(path)]
        if allowed:
            raise HttpError(405, f"method {method} not allowed", allow=sorted(set(allowed)))
        raise HttpError(404, f"no such resource: {path}")


class _Conn(asyncio.Protocol):
    """One client connection: httptools callbacks queue complete requests; a task serves
    them one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.max_body = server.max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.ready: deque[Request | HttpError] = deque()
        self.busy = False
        self.closing = False
        self.in_head = False
        self.head_bytes = 0
        self.lingering = 0  # > 0: answered and shut down for writing; bytes still to discard
        self.last_active = 0.0
        self.writable: asyncio.Future[None] | None = None  # set while the socket buffer is full
        self.task: asyncio.Task[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.last_active = self.server.clock()
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.conns.discard(self)
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.task is not None:
            self.task.cancel()  # a watch stream, or a blocking query, nobody waits for

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.lingering = max(self.lingering - len(data), 0)
            if not self.lingering:
                self.close()
            return
        self.last_active = self.server.clock()
        try:
            self.parser.feed_data(data)
        except HttpError as exc:
            self._fail(exc)
        except httptools.HttpParserUpgrade:
            self._fail(HttpError(400, "upgrade not supported"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # a callback's own error (413) comes wrapped
            self._fail(
                cause if isinstance(cause, HttpError) else HttpError(400, "malformed request")
            )
        if self.ready and not self.busy:
            self._next()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reset()
        self.in_head = True
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD:
            raise HttpError(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD:
            raise HttpError(431, "request head too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        """Refuse a body by the head (413 before a byte of it is read); answer ``Expect:
        100-continue`` when the body will be read."""
        self.in_head = False
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise HttpError(413, f"body larger than {self.max_body} bytes")
        has_body = (length.isdigit() and int(length) > 0) or "transfer-encoding" in self.headers
        if (
            has_body
            and self.headers.get("expect", "").lower() == "100-continue"
            and not self.busy
            and not self.ready  # an interim answer must not come before an earlier response
            and self.transport is not None
            and self.parser.get_http_version() == "1.1"
        ):
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise HttpError(413, f"body larger than {self.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        fast = self.server.fast
        if fast is not None and not self.body and not self.ready and not self.busy:
            keep = self.parser.should_keep_alive()
            response = fast(self.parser.get_method(), self.url, self.headers, keep)
            if response is not None and self.transport is not None:
                self.transport.write(response)
                self.server.requests += 1
                if not keep:
                    self.transport.close()
                    self.transport = None
                return
        path, _, query = self.url.decode("latin-1").partition("?")
        if not path.startswith("/"):  # absolute-form (RFC 9112 §3.2.2): keep the path
            path = urlsplit(path).path or "/"
        request = Request(
            self.parser.get_method().decode("latin-1"),
            path,
            parse_qs(query) if query else {},
            self.headers,
            b"".join(self.body),
            self.peer,
        )
        request.keep_alive = self.parser.should_keep_alive()
        self.ready.append(request)

    # serving

    def _fail(self, error: HttpError) -> None:
        """Unparseable or refused input: answer it after what is already queued, then close
        gracefully (see ``_linger``)."""
        self.ready.append(error)
        if self.transport is not None:
            self.transport.pause_reading()

    def _next(self) -> None:
        item = self.ready.popleft()
        self.busy = True
        if isinstance(item, HttpError):
            self._reply(self.server.error_reply(item), "GET", close=True, linger=True)
            return
        coro = self._serve(item)
        if not self.server.eager:
            self.task = asyncio.get_running_loop().create_task(coro)
            return
        # Most calls (a heartbeat) never wait: run the coroutine at once, and make a task only
        # for one that suspends (a blocking query, a watch), as Python 3.12's eager tasks do.
        # Only for handlers that need no current task (httpx/anyio inside one do): opt-in.
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        self.task = asyncio.get_running_loop().create_task(_resume(coro, yielded))

    async def _serve(self, request: Request) -> None:
        reply = await self.server.dispatch(request)
        if isinstance(reply, Stream):
            await self._stream(reply)
            return
        self._reply(reply, request.method, close=not request.keep_alive)

    def _reply(self, reply: Reply, method: str, close: bool, linger: bool = False) -> None:
        self.task = None
        transport = self.transport
        if transport is None:
            return
        body = reply.encode()
        extra = [*reply.headers, *([("Connection", "close")] if close else [])]
        head = _head(reply.status, reply.content_type, extra, f"Content-Length: {len(body)}")
        transport.write(head if method == "HEAD" else head + body)
        self.last_active = self.server.clock()
        if close:
            if linger:
                self._linger(transport)
            else:
                transport.close()
            return
        self.busy = False
        if self.ready:
            self._next()

    async def _stream(self, stream: Stream) -> None:
        transport = self.transport
        try:
            if transport is None:
                return
            transport.write(_head(200, stream.content_type, stream.headers, _CHUNKED))
            async for chunk in stream.chunks:
                if self.transport is None:
                    return
                if chunk:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.last_active = self.server.clock()
                    if self.writable is not None:
                        await self.writable
            if self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        finally:
            aclose = getattr(stream.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.transport is not None:
                self.transport.close()  # a stream ends its connection

    def _linger(self, transport: asyncio.Transport) -> None:
        """The lingering close after an error answered before the request was read whole:
        shut down writing (the answer is flushed first), then read and discard what the
        client still sends, up to ``LINGER_BYTES`` or ``LINGER_TIME`` or its own close. A
        plain close with unread bytes would reset the connection, and the client (still
        sending) would get ECONNRESET instead of the answer."""
        self.lingering = LINGER_BYTES
        self.ready.clear()
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_TIME, transport.close)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_active

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _resume(coro: Coroutine[Any, Any, None], yielded: object) -> None:
    """Drive ``coro`` on from where it first suspended (``yielded``: what it was waiting
    for, an asyncio future, or None for a bare yield), as a Task would."""
    while True:
        error: BaseException | None = None
        try:
            if isinstance(yielded, asyncio.Future):
                # The first yield happened outside a task, so nothing consumed the future's
                # "blocking" flag; a Task's step resets it exactly like this.
                yielded._asyncio_future_blocking = False
                await yielded
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError as exc:
            if not (isinstance(yielded, asyncio.Future) and yielded.cancelled()):
                error = exc  # this task was cancelled: pass it in
        except BaseException:
            pass
        try:
            yielded = coro.throw(error) if error is not None else coro.send(None)
        except StopIteration:
            return


_CHUNKED = "Transfer-Encoding: chunked"


def json_head(length: int, extra: str = "", close: bool = False) -> bytes:
    """The head of a 200 JSON response (for ``fast`` shortcuts); ``extra``: CRLF-ended
    fields."""
    end = "Connection: close\r\n" if close else ""
    return f"{_OK_JSON}{extra}{end}Content-Length: {length}\r\n\r\n".encode("latin-1")


_OK_JSON = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"


def _head(status: int, ctype: str, extra: list[tuple[str, str]], framing: str) -> bytes:
    start = _STARTS.get((status, ctype))
    if start is None:
        reason = HTTPStatus(status).phrase
        start = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        start += "Cache-Control: no-store\r\n"
        _STARTS[(status, ctype)] = start
    fields = "".join(f"{k}: {v}\r\n" for k, v in extra) if extra else ""
    return f"{start}{fields}{framing}\r\n\r\n".encode("latin-1")


_STARTS: dict[tuple[int, str], str] = {}  # status line and fixed fields, by (status, type)


class HttpServer:
    def __init__(
        self,
        router: Router,
        *,
        name: str,
        max_body: int = 64 * 1024,
        guard: Callable[[Request], None] | None = None,
        eager: bool = False,
        fast: Fast | None = None,
    ) -> None:
        self.router = router
        # a synchronous shortcut for the hottest call, tried before routing: it returns the
        # whole response, or None for the ordinary way
        self.fast = fast
        self.eager = eager  # start handlers outside a task (see _Conn._next)
        self.guard = guard  # runs before routing (auth): may raise HttpError
        self.name = name
        self.max_body = max_body
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.requests = 0
        self.conns: set[_Conn] = set()
        self.clock = time.monotonic
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Conn(self), host or None, port, reuse_address=True
        )
        addr = self.server.sockets[0].getsockname()
        self.address = (str(addr[0]), int(addr[1]))
        self._sweeper = loop.call_later(1.0, self._sweep)
        return self.address

    def _sweep(self) -> None:
        """Close keep-alive connections idle too long (one timer for all of them)."""
        now = self.clock()
        for conn in [c for c in self.conns if c.idle_for(now) > IDLE_TIMEOUT]:
            conn.close()
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        tasks = [c.task for c in self.conns if c.task is not None]
        for conn in list(self.conns):
            conn.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def dispatch(self, request: Request) -> Reply | Stream:
        self.requests += 1
        try:
            if self.guard is not None:
                self.guard(request)
            handler, params = self.router.resolve(request.method, request.path)
            return await handler(request, **params)
        except HttpError as exc:
            return self.error_reply(exc)
        except Exception:
            log.exception("%s API: internal error on %s %s", self.name, request.method,
                          request.path)  # fmt: skip
            return Reply(500, {"error": "internal error"})

    def error_reply(self, exc: HttpError) -> Reply:
        data: dict[str, Any] = {"error": exc.message, **exc.extra}
        headers = []
        if exc.status == 405:
            headers.append(("Allow", ", ".join(exc.extra.get("allow", []))))
        if exc.status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="poise"'))
        return Reply(exc.status, data, headers=headers)

    def __repr__(self) -> str:
        return f"HttpServer({self.name}, {self.address}, {self.requests} requests)"
