"""A small HTTP/1.1 server for poise's own JSON APIs (registry, admin): not the proxy.

Theory of operation
-------------------
Control-plane traffic is light, so this favours plain code over speed: asyncio streams, one
request at a time per connection (pipelined requests wait their turn), keep-alive. Requests
are parsed by httptools (llhttp), so framing is right: Content-Length and chunked bodies,
bodies capped at ``max_body`` (413), heads at 64 KiB (431), anything malformed gets 400 and
the connection closes (RFC 9112 §2.2: a server that cannot parse a request must not guess).

Routes are ``(method, pattern)`` pairs with ``{name}`` segments. A handler returns a ``Reply``
(JSON by default), or a ``Stream`` of chunks sent with chunked framing (long-lived watches),
ended when the client goes away. Errors raised as ``HttpError`` become JSON error replies;
anything else is logged and answered 500 without details (no traceback ever leaves).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httptools

log = logging.getLogger("poise.httpd")

MAX_HEAD = 64 * 1024
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit between requests
READ_TIMEOUT = 30.0  # seconds for the rest of a request once it has begun


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

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def json(self) -> Any:
        if not self.body:
            return None
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype != "application/json":
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
        return json.dumps(self.data, separators=(",", ":")).encode() + b"\n"


@dataclass
class Stream:
    chunks: AsyncIterator[bytes]
    content_type: str = "application/x-ndjson"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[..., Awaitable[Reply | Stream]]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self.routes.append((method, re.compile(regex + r"\Z"), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = []
        for m, regex, handler in self.routes:
            match = regex.match(path)
            if match is None:
                continue
            if m == method or (method == "HEAD" and m == "GET"):
                return handler, {k: unquote(v) for k, v in match.groupdict().items()}
            allowed.append(m)
        if allowed:
            raise HttpError(405, f"method {method} not allowed", allow=sorted(set(allowed)))
        raise HttpError(404, f"no such resource: {path}")


class _Parser:
    """httptools callbacks for one connection: completed requests queue up in ``ready``
    (pipelined ones included), each as (method, target, headers, body, keep_alive)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.ready: list[tuple[str, str, dict[str, str], bytes, bool]] = []
        self.in_head = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0

    def on_message_begin(self) -> None:
        self._reset()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.in_head = False

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise HttpError(413, f"body larger than {self.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        target = self.url.decode("latin-1")
        keep = self.parser.should_keep_alive()
        self.ready.append((method, target, self.headers, b"".join(self.body), keep))


def _head(status: int, ctype: str, extra: list[tuple[str, str]], framing: str) -> bytes:
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", framing]
    lines += [f"{k}: {v}" for k, v in extra]
    lines.append("Cache-Control: no-store")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpServer:
    def __init__(self, router: Router, *, name: str, max_body: int = 64 * 1024) -> None:
        self.router = router
        self.name = name
        self.max_body = max_body
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.requests = 0
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(
            self._serve, host or None, port, reuse_address=True
        )
        addr = self.server.sockets[0].getsockname()
        self.address = (str(addr[0]), int(addr[1]))
        return self.address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        p = _Parser(self.max_body)
        try:
            while await self._one(p, reader, writer, str(peer[0]) if peer else ""):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _one(
        self, p: _Parser, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bool:
        """Serve one request; False when the connection should close."""
        timeout = IDLE_TIMEOUT
        received = 0
        try:
            while not p.ready:
                data = await asyncio.wait_for(reader.read(65536), timeout)
                timeout = READ_TIMEOUT
                if not data:
                    return False
                received += len(data)
                p.parser.feed_data(data)
                if p.in_head and received > MAX_HEAD:
                    raise HttpError(431, "request head too large")
        except HttpError as exc:
            await self._send(writer, self._error(exc), "GET", close=True)
            return False
        except httptools.HttpParserUpgrade:
            await self._send(writer, Reply(400, {"error": "upgrade not supported"}), "GET", True)
            return False
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # a callback's own error (413) comes wrapped
            err = cause if isinstance(cause, HttpError) else HttpError(400, "malformed request")
            await self._send(writer, self._error(err), "GET", close=True)
            return False
        method, target, headers, body, keep = p.ready.pop(0)
        split = urlsplit(target)
        request = Request(method, split.path, parse_qs(split.query), headers, body, peer)
        self.requests += 1
        try:
            handler, params = self.router.resolve(method, request.path)
            reply = await handler(request, **params)
        except HttpError as exc:
            reply = self._error(exc)
        except Exception:
            log.exception("%s API: internal error on %s %s", self.name, method, request.path)
            reply = Reply(500, {"error": "internal error"})
        if isinstance(reply, Stream):
            await self._stream(writer, reply)
            return False
        await self._send(writer, reply, method, close=not keep)
        return keep

    def _error(self, exc: HttpError) -> Reply:
        data: dict[str, Any] = {"error": exc.message, **exc.extra}
        headers = []
        if exc.status == 405:
            headers.append(("Allow", ", ".join(exc.extra.get("allow", []))))
        if exc.status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="poise"'))
        return Reply(exc.status, data, headers=headers)

    async def _send(
        self, writer: asyncio.StreamWriter, reply: Reply, method: str, close: bool
    ) -> None:
        body = reply.encode()
        extra = [*reply.headers, *([("Connection", "close")] if close else [])]
        head = _head(reply.status, reply.content_type, extra, f"Content-Length: {len(body)}")
        writer.write(head if method == "HEAD" else head + body)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, stream: Stream) -> None:
        head = _head(200, stream.content_type, stream.headers, "Transfer-Encoding: chunked")
        writer.write(head)
        try:
            async for chunk in stream.chunks:
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            aclose = getattr(stream.chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def __repr__(self) -> str:
        return f"HttpServer({self.name}, {self.address}, {self.requests} requests)"
